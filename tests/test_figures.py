"""The figures both UIs share: palette, heat-maps, grids, plotly curves, and the Method text."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from app_helpers import small_config

from d2dpm import figures, teaching
from d2dpm.metrics import per_image_errors
from d2dpm.methods import METHODS
from d2dpm.errors import ConfigError
from d2dpm.experiment import Workbench
from d2dpm.sampler import StepRecord


@pytest.fixture(scope="module")
def result(conditional_model_dir, tmp_path_factory):
    workbench = Workbench(cache_dir=tmp_path_factory.mktemp("figures_cache"), device="cpu")
    return workbench.compare(small_config(conditional_model_dir, methods=("fp", "q", "ptqd", "s-d2", "d-d2", "oracle")))


def test_every_method_has_its_own_colour():
    colours = [figures.method_color(name) for name in METHODS]
    assert len(set(colours)) == len(colours)
    assert all(re.fullmatch(r"#[0-9A-F]{6}", c) for c in colours)
    assert figures.method_color("something-new") == figures.method_color("something-new")


def test_heat_colormap_runs_from_white_to_dark_red():
    rgb = figures.heat_colormap(np.array([0.0, 0.5, 1.0, 2.0, np.nan]))
    assert rgb.dtype == np.uint8
    assert tuple(rgb[0]) == (255, 255, 255) and tuple(rgb[4]) == (255, 255, 255)  # NaN reads as 0
    assert tuple(rgb[2]) == (127, 0, 0) and tuple(rgb[3]) == (127, 0, 0)  # clipped at 1
    assert rgb[1].sum() < rgb[0].sum()


def test_difference_maps_are_white_where_images_agree():
    reference = torch.rand(2, 3, 4, 4) * 2 - 1
    other = reference.clone()
    other[0, :, 0, 0] = -reference[0, :, 0, 0].sign()  # one pixel of one image differs
    maps = figures.difference_maps(other, reference, vmax=0.1)
    assert maps.shape == (2, 4, 4, 3)
    assert (maps[1] == 255).all()
    assert (maps[0, 0, 0] != 255).any() and (maps[0, 1:, :] == 255).all()


def test_psnr_is_measured_on_the_images_as_shown():
    """A pixel that drifted to 67 is shown white (1): it counts as off by 1 − reference, not by 67."""
    reference = torch.zeros(2, 3, 4, 4)
    drifted = reference.clone()
    drifted[0, 0, 0, 0] = 67.0
    drifted[1, 0, 0, 0] = 1.0
    mse, psnr = per_image_errors(drifted, reference, "image")
    assert torch.equal(mse[0], mse[1])
    assert float(mse[0]) == pytest.approx(0.5**2 / 48)  # [-1, 1] → [0, 1]: one value of 48 off by ½
    assert float(psnr[0]) == pytest.approx(10 * np.log10(48 / 0.25))


def test_grid_with_differences_adds_one_heat_map_row_per_method():
    samples = {name: torch.rand(3, 3, 8, 8) * 2 - 1 for name in ("fp", "q", "d-d2")}
    plain = figures.comparison_grid(samples, "image")
    with_maps = figures.comparison_grid(samples, "image", differences=True, title="t", column_titles=["a", "b", "c"])
    tile = 8 * 3 + figures.PADDING
    assert with_maps.height - plain.height >= 2 * tile  # two heat-map rows (q, d-d2), plus titles
    assert np.asarray(with_maps).std() > 10


def test_points_grid_uses_method_colours():
    samples = {"fp": torch.randn(50, 2), "q": torch.randn(50, 2)}
    grid = np.asarray(figures.comparison_grid(samples, "points", differences=True))
    q_rgb = figures._rgb(figures.method_color("q"))
    assert (grid.reshape(-1, 3) == q_rgb).all(1).any()


def _trace_names(fig) -> set[str]:
    return {trace.name for trace in fig.data if trace.name}


def test_deviation_figure_shows_every_curve_and_shades_unabsorbed_steps(result):
    fig = figures.deviation_figure(result.stats_table)
    names = " ".join(_trace_names(fig))
    for symbol in ("μ_Δ", "σ_Δ", "σ_cond", "ρ", "σ_t (DDIM)", "σ_t'", "k_t"):
        assert symbol in names
    # η = 0: σ_t = 0, nothing can be absorbed, every step is shaded (merged into one band per panel)
    assert not result.stats_table["variance_absorbed"].any()
    bands = [shape for shape in fig.layout.shapes if shape.type == "rect" and shape.fillcolor == "#9E9E9E"]
    assert len(bands) == 4
    assert bands[0].x0 == 0.5 and bands[0].x1 == len(result.stats_table) + 0.5
    assert any("η = 0" in a.text for a in fig.layout.annotations)
    fig.to_json()


def test_figure_two_histogram_and_joint_density(result):
    step = 2
    hist = figures.delta_histogram_figure(result.stats, step)
    fit = [t for t in hist.data if t.type == "scatter"][0]
    mu = float(result.stats.tensor["mu_y"][step])
    assert abs(fit.x[int(np.argmax(fit.y))] - mu) < (fit.x[1] - fit.x[0])  # the Gaussian peaks at μ_Δ
    joint = figures.joint_density_figure(result.stats, step)
    line = [t for t in joint.data if t.name and t.name.startswith("μ_cond")][0]
    x = np.asarray(line.x)
    slope = (line.y[-1] - line.y[0]) / (x[-1] - x[0])
    fit = result.stats.tensor
    expected = float(result.stats.rho("tensor")[step] * (fit["var_y"][step] / fit["var_x"][step]).sqrt())
    assert slope == pytest.approx(expected, rel=1e-4, abs=1e-9)
    with pytest.raises(ConfigError):
        figures.delta_histogram_figure(result.stats, len(result.stats.timesteps))


def test_trajectory_and_moment_figures_use_the_palette(result):
    fig = figures.trajectory_figure(result.trajectory)
    colours = {t.name: t.line.color for t in fig.data if t.showlegend is not False}
    assert colours["D-D²"] == METHODS["d-d2"].colour and colours["Oracle"] == METHODS["oracle"].colour
    assert "FP" not in colours  # FP is the reference: its distance to itself is 0
    assert list(fig.data[0].x) == list(range(1, len(result.records) + 1))  # 1-based steps
    # x after each step: never the 0 of the shared x_T (a log axis would draw it at 1e-8). The oracle may
    # equal FP exactly (ε̂ − (ε̂ − ε) is exact in float wherever ε̂ and ε are within a factor 2); then the
    # axis must stay linear, since a log axis cannot show its 0.
    assert all(y > 0 for trace in fig.data if trace.name != "Oracle" for y in trace.y)
    if any(y == 0 for trace in fig.data for y in trace.y):
        assert fig.layout.yaxis.type != "log"
    assert figures.trajectory_figure(result.trajectory[result.trajectory["method"] != "oracle"]).layout.yaxis.type == "log"
    moments = figures.moments_figure(result.trajectory)
    assert "FP" in _trace_names(moments)
    figures.metrics_figure(result.metrics).to_json()


def test_step_images_show_every_method(result):
    image = figures.step_images(result, 0)
    last = figures.step_images(result, len(result.records) - 1)
    assert image.height == last.height and image.height > 6 * 8 * 3
    assert np.asarray(image).std() > 10


def _points_result(steps=4, n=10):
    generator = torch.Generator().manual_seed(0)
    records = []
    states = {m: torch.randn(n, 2, generator=generator) * 2 for m in ("fp", "q", "d-d2")}
    for step in range(steps):
        step_records = {}
        for m, x in states.items():
            x_prev = x * 0.7
            step_records[m] = StepRecord(m, step, 1000 - 250 * step, x, x, x_prev, 0.0, None, x_prev)
            states[m] = x_prev
        records.append(step_records)
    return SimpleNamespace(records=records, model=SimpleNamespace(kind="points"))


def test_particles_figure_animates_every_step():
    fig = figures.particles_figure(_points_result(steps=4))
    assert len(fig.frames) == 5  # x_T and after each of the 4 steps
    markers = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    assert {t.name for t in markers} == {"FP", "Quantized", "D-D²"}
    assert len(fig.layout.sliders[0].steps) == 5
    assert any(t.type == "contour" for t in fig.data)  # the known density under the points
    fig.to_json()


def test_particles_figure_highlights_a_handful_of_paths_or_all():
    result = _points_result(steps=4, n=20)
    paths = lambda fig: [list(t.x).count(None) for t in fig.data if t.type == "scatter" and t.mode == "lines"]
    assert set(paths(figures.particles_figure(result))) == {figures.HIGHLIGHTED_PATHS}
    assert set(paths(figures.particles_figure(result, paths=None))) == {20}
    # every end point is drawn whatever the number of paths
    markers = [t for t in figures.particles_figure(result, paths=2).data if t.type == "scatter" and t.mode == "markers"]
    assert all(len(t.x) == 20 for t in markers)


def test_moments_draw_fp_over_the_oracle(result):
    fig = figures.moments_figure(result.trajectory)
    names = [t.name for t in fig.data]
    assert names.index("FP") > names.index("Oracle")
    assert [t.line.dash for t in fig.data if t.name == "Oracle"][0] == "dash"


def test_heat_maps_use_one_scale_for_every_run():
    small = {"fp": torch.zeros(1, 3, 4, 4), "q": torch.full((1, 3, 4, 4), 0.02)}
    large = {"fp": torch.zeros(1, 3, 4, 4), "q": torch.full((1, 3, 4, 4), 0.4)}
    assert figures.difference_scale(small) == figures.difference_scale(large) == figures.HEAT_VMAX
    # a small error stays pale, a large one dark: the grid's heat-map rows differ
    light = np.asarray(figures.comparison_grid(small, "image", differences=True)).astype(int).sum()
    dark = np.asarray(figures.comparison_grid(large, "image", differences=True)).astype(int).sum()
    assert dark < light


def test_method_page_has_the_equations_and_the_links():
    text = teaching.method_page_markdown()
    assert "arxiv.org/abs/2501.08180" in text and "github.com/TaylorJocelyn/D2-DPM" in text
    assert text.count("$$") % 2 == 0 and text.count("$$") >= 14
    for symbol in (r"\mu_{\text{cond}}", r"\sigma_{\text{cond}}", r"\sigma_t'", "k_t", "Predict, then toggle"):
        assert symbol in text


def test_method_page_blocks_separate_display_math():
    blocks = teaching.method_page_blocks()
    latex = [text for kind, text in blocks if kind == "latex"]
    assert len(latex) == teaching.method_page_markdown().count("$$") // 2
    assert all("$$" not in text for _, text in blocks)
    assert any(r"\begin{pmatrix}" in text for text in latex)
