"""Deviation curves: per-step μ_Δ, σ_Δ, ρ, σ_cond, σ_t, σ_t', k_t, and the paper's Figure 2."""

from d2dpm_app.streamlit_ui import deviation_page

deviation_page()
