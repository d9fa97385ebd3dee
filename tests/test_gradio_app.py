"""The Gradio app as a real server (`python app.py`), driven through gradio_client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from app_helpers import ROOT, SMALL, gradio_server


gradio_client = pytest.importorskip("gradio_client")

ALL_CLASSES = "all classes (one image each, cycling)"
EXPECTED_ENDPOINTS = {"/model_info", "/model_info_on_load", "/preset", "/bits", "/rows_note", "/validate", "/compare", "/views",
                      "/deviation_step", "/trajectory_step", "/particles"}


def compare_args(model_dir, **changes):
    """The /compare inputs in order: model, w, a, steps, η, guidance, class, seed, images,
    mean, variance, modes, ptqd, oracle, calibration samples, granularity, backbone."""
    s = dict(SMALL, guidance=3.0, class_choice=ALL_CLASSES, mean=True, variance=True, modes=["S-D²", "D-D²"], ptqd=True,
             oracle=False, granularity="channel", backbone="bias-correction")
    s.update(changes)
    return (str(model_dir), s["w_bits"], s["a_bits"], s["steps"], s["eta"], s["guidance"], s["class_choice"], s["seed"],
            s["num_images"], s["mean"], s["variance"], s["modes"], s["ptqd"], s["oracle"], s["calib_samples"], s["granularity"],
            s["backbone"])


@pytest.fixture(scope="module")
def server(tmp_path_factory, conditional_model_dir):
    tmp = tmp_path_factory.mktemp("gradio_server")
    with gradio_server(tmp, extra_env={"D2DPM_EXTRA_MODELS": str(conditional_model_dir)}) as (url, process):
        yield url, process, tmp


@pytest.fixture
def client(server, tmp_path):
    return gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path / "downloads"))


def test_every_event_has_an_api_name(client):
    assert EXPECTED_ENDPOINTS <= set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])


def test_compare_returns_what_the_cli_writes(client, conditional_model_dir, tmp_path):
    cli_out = tmp_path / "cli"
    env = dict(os.environ, D2DPM_CACHE_DIR=str(tmp_path / "cli_cache"), HF_HUB_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-m", "d2dpm", "compare", "--model", str(conditional_model_dir), "--w-bits", "4", "--a-bits", "8",
         "--steps", str(SMALL["steps"]), "--eta", "0", "--guidance", "3", "--seed", "0", "--num-images", str(SMALL["num_images"]),
         "--calib-samples", str(SMALL["calib_samples"]), "--methods", "fp,q,ptqd,s-d2,d-d2", "--backbone", "bias-correction",
         "--out", str(cli_out)],
        check=True, cwd=ROOT, env=env, capture_output=True, timeout=300,
    )
    job = client.submit(*compare_args(conditional_model_dir), api_name="/compare")
    image, summary, metrics, files = job.result(timeout=300)  # the session state stays on the server
    # it streamed: one update per sampling step, then the results
    assert len(job.outputs()) >= SMALL["steps"] + 1
    assert Path(image).is_file() and "BOPs" in summary
    by_name = {Path(f).name: Path(f) for f in files}
    assert {"grid.png", "metrics.csv", "per_image.csv", "trajectory.csv", "stats.csv", "run.json"} <= set(by_name)
    for name in ("metrics.csv", "per_image.csv", "trajectory.csv", "stats.csv"):
        ours, theirs = pd.read_csv(by_name[name]), pd.read_csv(cli_out / name)
        pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=1e-5, atol=1e-8)
    assert json.loads(by_name["run.json"].read_text())["config"] == json.loads((cli_out / "run.json").read_text())["config"]
    # the table on screen is the CSV, rounded for reading
    shown = pd.DataFrame(metrics["data"], columns=metrics["headers"])
    cli = pd.read_csv(cli_out / "metrics.csv")
    assert list(shown["method"]) == list(cli["label"])
    for text, value in zip(shown["PSNR to FP (dB)"][1:], cli["psnr_to_fp"][1:]):
        assert float(text.split("±")[0]) == pytest.approx(value, abs=0.006)
    assert [float(v) for v in shown["GBOPs"]] == pytest.approx(list(cli["gbops"]), abs=6e-4)

    # the other tabs of the same session
    views = client.predict(False, api_name="/views")
    # 17 outputs, 4 of them the tabs' prompt/view columns, which the API does not return
    assert len(views) == 13 and views[0]["plot"] and views[5]["plot"]
    hist, joint, caption = client.predict(2, api_name="/deviation_step")
    assert hist["plot"] and joint["plot"] and caption.startswith("Step 2")
    x0, caption = client.predict(1, api_name="/trajectory_step")
    assert Path(x0).is_file() and caption.startswith("Step 1/")


def test_an_identical_run_returns_from_the_cache(client, conditional_model_dir):
    args = compare_args(conditional_model_dir, seed=3, backbone="rtn")
    first = client.predict(*args, api_name="/compare")
    second = client.predict(*args, api_name="/compare")
    assert "returned from the cache of finished runs" not in first[1] and "returned from the cache of finished runs" in second[1]
    seconds = [float(re.search(r"([0-9.]+) s\.", summary).group(1)) for summary in (first[1], second[1])]
    assert seconds[1] < seconds[0]  # the time each run reports
    assert first[2] == second[2]  # the same table
    assert "What quantization did" in second[1]



def test_sessions_keep_only_a_key_and_finished_results_are_bounded(conditional_model_dir, tmp_path, monkeypatch):
    """A session's gr.State holds the key of its latest result, not the result; the shared store keeps
    at most its count and memory limits of results, so sessions cannot pile results up in memory."""
    import pickle

    import gradio as gr

    from d2dpm.experiment import CompareConfig, ComparisonResult, Workbench
    from d2dpm_app import common, gradio_ui

    monkeypatch.setenv("D2DPM_EXTRA_MODELS", str(conditional_model_dir))
    monkeypatch.setattr("d2dpm.experiment._default_workbench", Workbench(cache_dir=tmp_path, device="cpu"))
    monkeypatch.setattr(gradio_ui, "RESULTS", common.ResultStore(2))
    keys = []
    for seed in (0, 1, 2):
        *_, final = gradio_ui.run_compare(common.Controls.from_widgets(*compare_args(conditional_model_dir, seed=seed, backbone="rtn")), progress=lambda *a, **k: None)
        key = final[4]
        assert isinstance(key, CompareConfig) and not isinstance(key, ComparisonResult) and len(pickle.dumps(key)) < 2000
        keys.append(key)
    assert len(gradio_ui.RESULTS) == 2  # the oldest of three went
    with pytest.raises(gr.Error, match="no longer in the server's memory"):
        gradio_ui.trajectory_step(keys[0], 1)
    image, caption = gradio_ui.trajectory_step(keys[2], 1)
    assert caption.startswith("Step 1/")
    views = gradio_ui.refresh_views(keys[1])
    assert len(views) == gradio_ui.VIEW_COUNT
    # The memory limit: results beyond it go, least recently used first, but the latest always stays.
    results = [gradio_ui.RESULTS.get(key) for key in keys[1:]]
    one = common.result_bytes(results[0])
    assert one > 0
    store = common.ResultStore(16, max_mb=1.5 * one / 2**20)
    store.put(keys[1], results[0])
    store.put(keys[2], results[1])
    assert len(store) == 1 and store.get(keys[2]) is results[1] and store.nbytes() <= 1.5 * one
    tiny = common.ResultStore(16, max_mb=0)
    tiny.put(keys[1], results[0])
    assert tiny.get(keys[1]) is results[0]  # alone and over the limit: kept, it is the visitor's latest

def test_visitors_at_once_get_independent_results(server, conditional_model_dir, tmp_path):
    # Three visitors submit together (two with the same seed); the queue runs two at a time.
    visitors = [gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path / f"v{i}")) for i in range(3)]
    jobs = [v.submit(*compare_args(conditional_model_dir, seed=seed), api_name="/compare") for v, seed in zip(visitors, (7, 8, 7))]
    metrics = [pd.DataFrame(job.result(timeout=600)[2]["data"]) for job in jobs]
    pd.testing.assert_frame_equal(metrics[0], metrics[2])  # same seed, same numbers, whatever ran beside it
    assert not metrics[0].equals(metrics[1])


def test_bad_input_gives_a_clear_message_and_the_server_keeps_serving(client, server, conditional_model_dir):
    too_much = compare_args(conditional_model_dir, num_images=32, steps=100)
    for endpoint in ("/validate", "/compare"):
        with pytest.raises(gradio_client.exceptions.AppError, match="image-steps"):
            client.predict(*too_much, api_name=endpoint)
    with pytest.raises(gradio_client.exceptions.AppError, match="D2DPM_EXTRA_MODELS"):  # not on the operator's list
        client.predict(*compare_args(server[2] / "no_such_model"), api_name="/compare")
    with pytest.raises(gradio_client.exceptions.AppError, match="Run a comparison first"):
        client.predict(1, api_name="/trajectory_step")
    assert server[1].poll() is None
    message, _, _, count = client.predict(str(conditional_model_dir), api_name="/model_info")
    assert "class-conditional (3 classes)" in message
    assert count["value"] == 3  # one image per class by default


def test_the_default_model_is_emoji_and_its_absence_is_explained(client):
    message, _, _, _ = client.predict("emoji", api_name="/model_info_on_load")
    if not (ROOT / "assets" / "models" / "emoji").is_dir():
        assert "not installed" in message and "d2dpm train" in message
    else:
        assert "emoji" in message
    w, a = client.predict("W4A6", api_name="/preset")
    assert (w["value"], a["value"]) == (4, 6)
    assert client.predict(6, 8, api_name="/bits")["value"] == "custom"  # moving a slider updates the preset
    assert client.predict(8, 8, api_name="/bits")["value"] == "W8A8"


# -- the widget → configuration layer both UIs share (no server needed)

def test_switches_select_the_methods():
    from d2dpm_app.common import methods_from_switches

    assert methods_from_switches(True, True, ["S-D²", "D-D²"], ["ptqd"]) == ("fp", "q", "ptqd", "s-d2", "d-d2")
    assert methods_from_switches(True, False, ["S-D²", "D-D²"], ["oracle"]) == ("fp", "q", "mean-only", "oracle")
    assert methods_from_switches(False, True, ["D-D²"]) == ("fp", "q", "var-only")
    assert methods_from_switches(False, False, ["S-D²"]) == ("fp", "q")


def test_controls_start_from_the_core_defaults_and_read_gradios_widgets_in_order():
    from d2dpm.config import CompareConfig
    from d2dpm_app.common import Controls

    default = CompareConfig()
    controls = Controls()
    assert controls.methods == default.methods
    assert (controls.w_bits, controls.a_bits, controls.steps, controls.eta, controls.seed, controls.num_images, controls.calib_samples,
            controls.granularity) == (default.w_bits, default.a_bits, default.steps, default.eta, default.seed, default.num_images,
                                      default.calib_samples, default.granularity)
    # /compare's inputs, in the order compare_args gives them: one checkbox per extra row in place of `rows`
    assert Controls.widget_names() == ["model", "w_bits", "a_bits", "steps", "eta", "guidance", "class_choice", "seed", "num_images",
                                       "mean", "variance", "modes", "ptqd", "oracle", "calib_samples", "granularity", "backbone"]
    widgets = Controls.from_widgets(*compare_args("m", oracle=True, ptqd=False))
    assert widgets.rows == ("oracle",) and widgets.model == "m" and widgets.backbone == "bias-correction"
    assert widgets.methods == ("fp", "q", "s-d2", "d-d2", "oracle")


def test_build_config_enforces_the_cpu_budget_and_reads_widgets(conditional_model_dir, monkeypatch):
    from d2dpm.errors import ConfigError
    from d2dpm_app import common

    monkeypatch.setenv("D2DPM_EXTRA_MODELS", str(conditional_model_dir))
    monkeypatch.setattr(common, "DEFAULT_BACKBONE", "rtn")
    def build(*values, **changes):
        return common.build_config(common.Controls(str(conditional_model_dir), *values, **changes))

    config = build(4.0, 6.0, 10.0, 0.5, 2.5, "2: class 2", 7.0, 3.0)
    assert (config.w_bits, config.a_bits, config.steps, config.class_label, config.seed, config.guidance) == (4, 6, 10, 2, 7, 2.5)
    assert config.calib_samples == common.DEFAULT.calib_samples
    assert build(4, 8, 10, 0, 3, common.ALL_CLASSES, 0, 3).class_label is None
    steps = common.MAX_IMAGE_STEPS // (5 * 8)
    build(4, 8, steps, 0, 3, None, 0, 8, calib_samples=2)  # exactly at the cap
    with pytest.raises(ConfigError, match="image-steps") as error:
        build(4, 8, steps + 1, 0, 3, None, 0, 8, calib_samples=2)
    assert error.value.argument == "num_images"
    with pytest.raises(ConfigError, match="mode"):
        build(4, 8, 10, 0, 3, None, 0, 2, modes=["X"])
    summary = common.describe_model("emoji")
    if not (ROOT / "assets" / "models" / "emoji").is_dir():
        assert not summary.ok and "not installed" in summary.message
    else:
        assert summary.ok and summary.conditional and len(summary.class_choices()) == len(summary.class_names) + 1


def test_toy_points_are_budgeted_as_a_fraction_of_an_image():
    from d2dpm.errors import ConfigError
    from d2dpm_app import common

    default = common.SAMPLE_COUNTS["points"].default
    assert common.check_budget(default, ("fp", "q", "ptqd", "s-d2", "d-d2"), 20, "points") == default / common.POINTS_PER_IMAGE * 100
    with pytest.raises(ConfigError, match="points") as error:
        common.check_budget(common.SAMPLE_COUNTS["points"].maximum, tuple("abcdefgh"), 100, "points")
    assert error.value.argument == "num_images" and "image-steps" in error.value.allowed


def test_theme_can_be_compared_with_gradio_built_in_themes():
    # launch() compares the app's theme with each built-in one (for its usage report); a font
    # given as a plain string made that comparison raise after the server had started.
    from gradio import utils

    from d2dpm_app.gradio_ui import theme

    assert not any(theme().to_dict() == built_in.to_dict() for built_in in utils.BUILT_IN_THEMES.values())
