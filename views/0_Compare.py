"""Compare: FP, the quantized model and each correction, sampled from the same noise."""

from d2dpm_app.streamlit_ui import compare_page

compare_page()
