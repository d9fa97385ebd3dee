"""Method: the equations and a short teaching text."""

from d2dpm_app.streamlit_ui import method_page

method_page()
