"""D²-DPM demo: `python app.py` serves the Gradio app; `streamlit run app.py` serves the
Streamlit app, whose home page (Compare) is this file and whose other views are in views/.
One file, so the same repository works as a Hugging Face Space with either SDK.
"""


def _inside_streamlit() -> bool:
    try:
        from streamlit import runtime
    except ImportError:  # the Gradio Space need not install streamlit
        return False
    return runtime.exists()


if _inside_streamlit():
    from d2dpm_app.streamlit_ui import run_app

    run_app()
elif __name__ == "__main__":
    from d2dpm_app.gradio_ui import main

    main()
