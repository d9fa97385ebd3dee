"""The UI layer of the d2dpm demo (Gradio and Streamlit); the core `d2dpm` never imports it."""
