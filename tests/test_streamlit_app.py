"""The Streamlit app through `streamlit.testing.v1.AppTest`: the home page (Compare) and every page
of `streamlit run app.py`, with real comparisons on tiny random models (no download, no browser).

What is checked: the home page starts with the default model (or says why it cannot); a run shows
the sample grid, the metrics table (the same numbers the core computes for the same configuration),
the plots and the downloads; bad input shows `st.error` (never a traceback) and the app keeps
serving; the Deviation curves, Trajectories and Method pages render after a run, and invite a run
before one; the settings survive a visit to another page; a point model gets the particles view.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
COMPARE, DEVIATION, TRAJECTORIES, METHOD = "views/0_Compare.py", "views/1_Deviation_curves.py", "views/2_Trajectories.py", "views/3_Method.py"
TIMEOUT = 300  # seconds per script run: generous, CI has 2 shared cores
FAST = {"steps": 4, "num_images": 2, "calib_samples": 8}  # a comparison of a few seconds on the tiny model


@pytest.fixture
def default_model(monkeypatch):
    """Point the app's default model at a folder (what D2DPM_APP_MODEL does for a server)."""
    from d2dpm_app import common

    def use(folder: Path) -> None:
        monkeypatch.setattr(common, "DEFAULT_MODEL", str(folder))
        monkeypatch.setenv("D2DPM_EXTRA_MODELS", str(folder))  # what an operator allows
        monkeypatch.setattr(common, "DEFAULT_BACKBONE", "bias-correction")  # tiny models have no shipped statistics

    return use


def start(default_model, folder: Path) -> AppTest:
    default_model(folder)
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not app.exception, app.exception
    return app


def fast_settings(app: AppTest, **overrides) -> AppTest:
    for key, value in {**FAST, **overrides}.items():
        app.slider(key=key).set_value(value)
    return app


def run_comparison(app: AppTest) -> AppTest:
    app.button(key="run").click().run()
    assert not app.exception, app.exception
    return app


def texts(elements) -> str:
    return "\n".join(str(element.value) for element in elements)


def no_traceback(app: AppTest) -> None:
    assert not app.exception, app.exception
    assert "Traceback" not in texts(app.error) + texts(app.markdown)


def save_points_model(folder: Path) -> Path:
    """A tiny random 2-D point model in d2dpm's folder format (what `d2dpm train --dataset toy2d` writes)."""
    from diffusers import DDIMScheduler

    from d2dpm.toy import ToyEpsMLP

    torch.manual_seed(0)
    ToyEpsMLP(hidden_size=16, num_layers=2, time_embedding_dim=16).save_pretrained(folder / "network")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(folder / "scheduler")
    meta = {"name": "tiny-points", "kind": "points", "network_class": "ToyEpsMLP", "network_subfolder": "network", "sample_shape": [2]}
    (folder / "d2dpm_model.json").write_text(json.dumps(meta))
    return folder


def test_home_page_starts_with_the_embedded_default_or_says_why_not():
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    no_traceback(app)
    assert "D²-DPM" in texts(app.title)
    assert app.selectbox(key="model_choice").value == "emoji"
    if not (ROOT / "assets" / "models" / "emoji" / "d2dpm_model.json").is_file():
        assert "not installed" in texts(app.warning)
    else:
        assert not app.warning, texts(app.warning)
    # nothing runs before the visitor asks: the landing shows the shipped example, or invites a run
    from d2dpm_app import story

    if story.load_example() is not None:
        assert len(app.get("image")) == 1 and "What quantization did" in texts(app.markdown)
        assert "Precomputed example" in texts(app.markdown)
    else:
        assert "Run comparison" in texts(app.info) and not app.get("image")
    assert "result" not in app.session_state


def test_home_page_runs_a_comparison_with_the_core_numbers(default_model, conditional_model_dir):
    from d2dpm.experiment import default_workbench
    from d2dpm_app import common

    app = start(default_model, conditional_model_dir)
    assert "class-conditional" in texts(app.caption)
    run_comparison(fast_settings(app))
    no_traceback(app)
    assert not app.error, texts(app.error)
    assert app.get("image"), "no sample grid shown"
    assert app.get("plotly_chart"), "no plot shown"
    assert "BOPs" in texts(app.markdown)  # the efficiency line
    labels = {button.proto.label for button in app.get("download_button")}
    assert {label.split()[-1] for label in labels} == set(common.DOWNLOAD_NAMES), labels  # the same files as Gradio's
    assert "What quantization did" in texts(app.markdown)  # the interpretation under the result

    # The table shows what the core computes for the same configuration (same noise, same numbers).
    config = app.session_state["config"]
    assert (config.steps, config.num_images, config.calib_samples) == (FAST["steps"], FAST["num_images"], FAST["calib_samples"])
    assert config.methods == ("fp", "q", "ptqd", "s-d2", "d-d2")
    expected = common.metrics_display(default_workbench().compare(config).metrics)
    shown = app.dataframe[0].value.reset_index(drop=True)
    pd.testing.assert_frame_equal(shown.astype(str), expected.astype(str), check_dtype=False)

    # The same settings again: the finished comparison comes back from the shared store.
    result = app.session_state["result"]
    run_comparison(app)
    assert app.session_state["result"] is result
    assert "returned from the cache of finished runs" in texts(app.markdown)


def test_toggles_choose_the_rows(default_model, conditional_model_dir):
    app = fast_settings(start(default_model, conditional_model_dir))
    app.radio(key="backbone").set_value("rtn")
    app.toggle(key="variance").set_value(False)
    app.checkbox(key="ptqd").set_value(False)
    app.checkbox(key="oracle").set_value(True)
    run_comparison(app)
    assert not app.error, texts(app.error)
    # variance off: S-D² and D-D² coincide in the mean-only row
    assert app.session_state["config"].methods == ("fp", "q", "mean-only", "oracle")
    assert app.session_state["config"].backbone == "rtn"  # the backbone selector reaches the core
    assert "same" in texts(app.info)  # why S-D² and D-D² became one row
    assert list(app.dataframe[0].value["method"]) == ["FP", "Quantized", "D² mean only", "Oracle"]


def test_bad_input_shows_an_error_and_the_app_keeps_serving(default_model, conditional_model_dir, tmp_path):
    app = start(default_model, conditional_model_dir)

    # Over the documented CPU budget: a clear message naming the budget, no traceback.
    app.slider(key="steps").set_value(100)
    app.slider(key="num_images").set_value(32)
    run_comparison(app)
    no_traceback(app)
    message = texts(app.error)
    assert "image-steps" in message and "allowed" in message, message
    assert "result" not in app.session_state

    # A model folder that does not exist: warned about at once, refused with a message on run.
    app.text_input(key="model_path").set_value(str(tmp_path / "no-such-model")).run()
    no_traceback(app)
    assert "no-such-model" in texts(app.warning)
    run_comparison(app)
    no_traceback(app)
    assert "model" in texts(app.error)

    # The same session still works once the input is fixed.
    app.text_input(key="model_path").set_value(str(conditional_model_dir)).run()
    run_comparison(fast_settings(app))
    no_traceback(app)
    assert not app.error, texts(app.error)
    assert app.get("image") and len(app.dataframe[0].value) == 5


def test_every_page_renders_after_a_run(default_model, conditional_model_dir):
    app = run_comparison(fast_settings(start(default_model, conditional_model_dir)))
    assert not app.error, texts(app.error)

    app.switch_page(DEVIATION).run()
    no_traceback(app)
    assert "Deviation" in texts(app.title)
    assert len(app.get("plotly_chart")) >= 3  # the per-step curves, the Δ histogram, the joint density
    caption = texts(app.markdown)
    app.slider(key="deviation_step").set_value(1).run()  # the paper's Figure 2 at another step
    no_traceback(app)
    assert len(app.get("plotly_chart")) >= 3 and texts(app.markdown) != caption
    assert "Step 1 " in texts(app.markdown)

    app.switch_page(TRAJECTORIES).run()
    no_traceback(app)
    assert "Trajectories" in texts(app.title)
    assert len(app.get("plotly_chart")) >= 2  # RMSE to FP, mean/std of x_t
    assert app.get("image")  # predicted x₀ at the chosen step
    app.slider(key="trajectory_step").set_value(1).run()
    no_traceback(app)
    assert app.get("image") and "Step 1/" in texts(app.markdown)

    app.switch_page(METHOD).run()
    no_traceback(app)
    page = texts(app.markdown) + texts(app.latex)
    assert "2501.08180" in page and "TaylorJocelyn/D2-DPM" in page
    assert "predict" in page.lower()
    assert len(app.latex) >= 5 and "\\sigma" in texts(app.latex)  # the equations, as LaTeX


def test_settings_survive_a_visit_to_another_page(default_model, conditional_model_dir):
    app = fast_settings(start(default_model, conditional_model_dir), eta=0.5)
    app.radio(key="preset").set_value("custom").run()
    app.slider(key="w_bits_custom").set_value(3)
    app.toggle(key="variance").set_value(False)
    app.checkbox(key="oracle").check().run()
    app.switch_page(METHOD).run()
    app.switch_page(COMPARE).run()  # Streamlit drops the Compare widgets' state while they are not shown
    no_traceback(app)
    assert app.slider(key="steps").value == FAST["steps"] and app.slider(key="eta").value == 0.5
    assert app.radio(key="preset").value == "custom" and app.slider(key="w_bits_custom").value == 3
    assert app.toggle(key="variance").value is False and app.checkbox(key="oracle").value is True


@pytest.mark.parametrize("page", [DEVIATION, TRAJECTORIES])
def test_pages_before_a_run_invite_one_and_run_it(default_model, conditional_model_dir, page):
    from d2dpm_app import common

    app = start(default_model, conditional_model_dir)
    app.switch_page(page).run()
    no_traceback(app)
    assert "No comparison yet" in texts(app.info)
    assert not app.get("plotly_chart")
    # The page's own button runs the last settings (here: fast ones) and shows the page.
    app.session_state["config"] = common.build_config(common.Controls(str(conditional_model_dir), 4, 8, FAST["steps"], 0.0, 3.0, None, 0,
                                                                      FAST["num_images"], calib_samples=FAST["calib_samples"]))
    app.button(key="run_default").click().run()
    no_traceback(app)
    assert not app.error, texts(app.error)
    assert app.session_state["result"].config.steps == FAST["steps"]
    assert len(app.get("plotly_chart")) >= 2


def test_method_page_needs_no_run(default_model, conditional_model_dir):
    app = start(default_model, conditional_model_dir)
    app.switch_page(METHOD).run()
    no_traceback(app)
    assert "2501.08180" in texts(app.markdown) and len(app.latex) >= 5


def test_point_model_shows_particles(default_model, tmp_path):
    from d2dpm_app import common

    folder = save_points_model(tmp_path / "points")
    app = start(default_model, folder)
    assert not app.warning, texts(app.warning)
    points = app.slider(key="num_points")  # a point model asks for points, and many of them
    assert points.label == "Points" and points.value == common.SAMPLE_COUNTS["points"].default
    for key, value in {"steps": FAST["steps"], "calib_samples": FAST["calib_samples"], "num_points": 300}.items():
        app.slider(key=key).set_value(value)
    run_comparison(app)
    no_traceback(app)
    assert not app.error, texts(app.error)
    assert app.get("image")  # scatter panels, one per method
    app.switch_page(TRAJECTORIES).run()
    no_traceback(app)
    assert len(app.get("plotly_chart")) >= 3  # RMSE, moments, and the particles over the density


# -- Streamlit's stop: the script ends only at a page update, so a run that waits must keep updating


class VisitorStopped(Exception):
    """What Streamlit raises at the script's next page update once the visitor pressed Stop."""


class StoppableBar:
    """Stands in for st.progress: its updates raise once `stop` is set, as Streamlit's do after a Stop."""

    def __init__(self, stop):
        self.stop, self.updates = stop, 0

    def progress(self, *args, **kwargs):
        self.updates += 1
        if self.stop.is_set():
            raise VisitorStopped()

    def empty(self):
        pass


@pytest.mark.parametrize("waits_for", ["a silent calibration", "a sampling slot"])
def test_streamlit_stop_ends_a_run_that_waits(waits_for, monkeypatch):
    import threading
    import time

    from d2dpm.experiment import CompareConfig
    from d2dpm_app import common, streamlit_ui

    stop, started, ended = threading.Event(), threading.Event(), threading.Event()

    def silent_calibration(config, progress=None, allow_calibration=True, should_stop=None, public=False):
        """A calibration phase that reports nothing for 60 s, but ends at its next step once stopped."""
        started.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if should_stop is not None and should_stop():
                ended.set()
                raise common.Cancelled("stopped")
        yield None

    class Bench:
        iter_compare = staticmethod(silent_calibration)

    monkeypatch.setattr(common, "default_workbench", lambda: Bench())
    monkeypatch.setattr(streamlit_ui, "result_store", lambda: common.ResultStore(2))
    bar = StoppableBar(stop)
    monkeypatch.setattr(streamlit_ui.st, "progress", lambda *args, **kwargs: bar)
    plan = common.Plan(CompareConfig(model="emoji", seed=12345), calibrates=waits_for == "a silent calibration", work=0.0)
    held = []
    if waits_for == "a sampling slot":  # every slot busy with other visitors' comparisons
        while common._sampling_slots.acquire(blocking=False):
            held.append(True)
    outcome = {}

    def visitor():
        try:
            streamlit_ui.run_comparison(plan)
        except BaseException as error:
            outcome["error"] = error
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=visitor, daemon=True)
    try:
        thread.start()
        time.sleep(1.5)
        assert thread.is_alive()  # still waiting, the page kept up to date
        pressed = time.monotonic()
        stop.set()  # the visitor presses Stop
        thread.join(timeout=10)
        assert not thread.is_alive(), "Stop did not end the wait"
        assert isinstance(outcome["error"], VisitorStopped) and outcome["at"] - pressed < 3 * streamlit_ui.STOP_CHECK_SECONDS + 1
        assert bar.updates >= 2
        if waits_for == "a silent calibration":
            assert started.is_set() and ended.wait(10)  # the worker stopped at its next step
            assert common._calibration_lane.acquire(timeout=10)  # and gave its lane back
            common._calibration_lane.release()
        else:
            assert not started.is_set()  # it never ran
    finally:
        for _ in held:
            common._sampling_slots.release()


def test_the_visitor_has_a_stop_button():
    """Streamlit's Stop lives in its status widget, which toolbarMode "minimal" hides: a visitor could then
    not stop a run at all (checked in Chromium: "viewer" shows Running… and Stop, and no Deploy button)."""
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["toolbarMode"] == "viewer"
