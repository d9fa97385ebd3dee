"""The interpretation under every result and the landing's shipped example (d2dpm_app.story), and
the display helpers both apps share (presets, the rows note, downloads)."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from app_helpers import small_config
from PIL import Image

from d2dpm import figures
from d2dpm.experiment import Workbench
from d2dpm.models import load_model
from d2dpm.schedule import DDIMSchedule
from d2dpm_app import common, story


@pytest.fixture(scope="module")
def result(conditional_model_dir, tmp_path_factory):
    workbench = Workbench(cache_dir=tmp_path_factory.mktemp("story_cache"), device="cpu")
    return workbench.compare(small_config(conditional_model_dir, backbone="rtn", methods=("fp", "q", "ptqd", "d-d2", "oracle")))


def test_numbers_are_measured_from_the_samples_and_the_metrics(result):
    numbers = story.story_numbers(result)
    json.dumps(numbers, allow_nan=False)  # JSON-ready
    fp = result.samples["fp"].double()
    q = result.samples["q"].double()
    assert numbers["methods"]["q"]["mean_shift"] == pytest.approx(float(q.mean() - fp.mean()))
    assert numbers["methods"]["q"]["spread_ratio"] == pytest.approx(float(q.std() / fp.std()))
    assert numbers["methods"]["q"]["error_removed"] is None
    mse = dict(zip(result.metrics["method"], result.metrics["mse_to_fp"]))
    for method in ("ptqd", "d-d2", "oracle"):
        assert numbers["methods"][method]["error_removed"] == pytest.approx(1 - mse[method] / mse["q"])
    assert numbers["methods"]["oracle"]["error_removed"] > 0.99  # the oracle removes (nearly) everything
    assert numbers["backbone"] == "rtn" and numbers["bits"] == "W4A8"


def test_the_text_says_what_the_numbers_say(result):
    numbers = story.story_numbers(result)
    text = story.interpretation(numbers)
    for method in ("ptqd", "d-d2"):
        values = numbers["methods"][method]
        verb = "removed" if values["error_removed"] >= 0 else "added"
        assert f"{values['label']} {verb} {abs(values['error_removed']) * 100:.0f} %" in text
    assert f"PSNR to FP {numbers['methods']['q']['psnr_to_fp']:.1f} dB" in text
    # other numbers, other words
    washed = copy.deepcopy(numbers)
    washed["methods"]["q"].update(mean_shift=0.3, spread_ratio=0.5)
    assert "washed out" in story.interpretation(washed) and "brighter on average by 15.0 %" in story.interpretation(washed)
    grainy = copy.deepcopy(numbers)
    grainy["methods"]["q"].update(mean_shift=-0.1, spread_ratio=1.6)
    assert "grainier" in story.interpretation(grainy) and "darker on average by 5.0 %" in story.interpretation(grainy)
    worse = copy.deepcopy(numbers)
    for values in worse["methods"].values():
        if values["error_removed"] is not None:
            values["error_removed"] = -0.25
    assert "added 25 %" in story.interpretation(worse) and "No correction brought" in story.interpretation(worse)


def test_the_identity_step_is_the_one_that_leaves_x_unchanged(result, conditional_model_dir):
    identity = figures.identity_steps(result.stats_table)
    assert identity == [len(result.stats_table) - 1]  # t = 0 → the final ᾱ: the last step
    model = load_model(str(conditional_model_dir))
    schedule = DDIMSchedule(model.scheduler_config, result.config.steps, result.config.eta)
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for index, coeff in enumerate(schedule.steps):
        x_prev, _ = schedule.step(x, eps, coeff, coeff.sigma, torch.randn_like(x))
        assert torch.allclose(x_prev, x, atol=1e-5) == (index in identity)
    numbers = story.story_numbers(result)
    assert numbers["identity_steps"] == [identity[0] + 1]
    assert numbers["peak_mean_step"] - 1 not in identity
    fig = figures.deviation_figure(result.stats_table)
    assert any("identity" in (trace.name or "") for trace in fig.data)


def test_the_example_round_trip_gives_the_same_text(result, tmp_path):
    grid = common.final_grid(result)
    story.write_example(result, grid, "a title", tmp_path)
    example = story.load_example(tmp_path)
    assert example is not None and example.title == "a title"
    assert example.text() == story.interpretation(story.story_numbers(result))
    assert np.array_equal(np.asarray(example.grid.convert("RGB")), np.asarray(grid.convert("RGB")))
    pd.testing.assert_frame_equal(example.metrics, result.metrics, check_exact=False, rtol=1e-9)
    assert example.config["backbone"] == "rtn"
    note = story.example_note(example, result.config)
    assert "Precomputed example" in note and "Made with" not in note
    assert "backbone 'rtn'" in story.example_note(example, small_config("x", backbone="adaround"))
    # missing or from another format: no example (the landing then just invites a run)
    assert story.load_example(tmp_path / "nothing") is None
    data = json.loads((tmp_path / "story.json").read_text())
    data["numbers"]["format"] = 0
    (tmp_path / "story.json").write_text(json.dumps(data))
    assert story.load_example(tmp_path) is None


def test_the_shipped_example_loads_when_present():
    example = story.load_example(story.EXAMPLE_DIR)
    if not (story.EXAMPLE_DIR / "story.json").is_file():
        pytest.skip("no example shipped (python scripts/make_example.py makes it)")
    assert example is not None and example.grid.width > 100
    assert "What quantization did" in example.text()
    assert set(example.metrics["method"]) >= {"fp", "q"}


def test_downloads_are_the_same_files_in_both_apps(result, tmp_path):
    written = {path.name: path for path in common.write_downloads(result, tmp_path)}
    payloads = {name: data for name, data, _ in common.download_payloads(result)}
    assert list(payloads) == list(common.DOWNLOAD_NAMES) and set(written) == set(payloads)
    for name, data in payloads.items():
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(Image.open(written[name])))
        else:
            assert data == written[name].read_bytes(), name


def test_preset_radio_and_rows_note():
    assert common.preset_for_bits(4, 8) == "W4A8" and common.preset_for_bits(8.0, 8.0) == "W8A8"
    assert common.preset_for_bits(6, 8) == common.CUSTOM_PRESET
    assert "no D² row" in common.rows_note(False, False, ["S-D²", "D-D²"])
    assert "no D² row" in common.rows_note(True, True, [])
    assert "same" in common.rows_note(True, False, ["S-D²", "D-D²"])
    assert common.rows_note(True, True, ["D-D²"]) == ""


def test_points_have_no_psnr_column_and_an_mse_chart(result):
    shown = common.metrics_display(result.metrics, "points")
    assert "PSNR to FP (dB)" not in shown.columns and "MSE to FP" in shown.columns
    assert figures.metrics_figure(result.metrics, "points").layout.yaxis.title.text == "MSE"
    psnr = figures.metrics_figure(result.metrics)
    oracle = float(result.metrics.set_index("method").loc["oracle", "psnr_to_fp"])
    others = result.metrics[~result.metrics["method"].isin(["fp", "oracle"])]["psnr_to_fp"].max()
    if oracle > 1.25 * others > 0:  # the oracle's bar is cut, its value written on it
        assert psnr.layout.yaxis.range[1] == pytest.approx(1.25 * others)
        assert any("↑" in t for t in psnr.data[0].text)
