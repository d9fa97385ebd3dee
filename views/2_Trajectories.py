"""Trajectories: RMSE to FP per step, mean/std of x_t, predicted x₀ per step, toy2d particles."""

from d2dpm_app.streamlit_ui import trajectories_page

trajectories_page()
