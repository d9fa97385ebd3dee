"""Pictures of a comparison, shared by the CLI and both UIs.

Pillow for image grids and difference heat-maps, plotly for every curve. One colour and label per
method (the registry's, `d2dpm.methods`) are used everywhere, in both UIs, so a student can follow
"D-D²" from the image rows to the curves. Nothing here imports a UI library.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .methods import METHODS

_EXTRA_COLORS = ("#7F3C8D", "#11A579", "#3969AC", "#F2B701", "#E73F74")

BACKGROUND = (255, 255, 255)
POINTS_PANEL = 260  # pixels per scatter panel of a point model (the `scale` of image tiles does not apply)
INK = (30, 30, 30)
LABEL_WIDTH = 150
PADDING = 4


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → [N, H, W, 3] uint8 (grey images repeated to RGB)."""
    images = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = images.permute(0, 2, 3, 1).numpy()
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


_FONT_CANDIDATES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
_ASCII_FALLBACK = str.maketrans({"η": "eta", "²": "2", "σ": "sigma", "Δ": "Delta", "ε": "eps", "→": "->"})


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans (it has the Greek letters of the labels) where installed, else Pillow's own."""
    for candidate in _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _text(label: str, font: ImageFont.ImageFont) -> str:
    """The label as the font can draw it: Pillow's fallback font has no Greek letters."""
    return label if isinstance(font, ImageFont.FreeTypeFont) and "DejaVu" in font.getname()[0] else label.translate(_ASCII_FALLBACK)


def _draw_text(draw: ImageDraw.ImageDraw, xy, label: str, size: int, anchor: str = "la", max_width: int | None = None) -> None:
    font = _font(size)
    text = _text(label, font)
    while max_width is not None and len(text) > 1 and font.getlength(text) > max_width:
        text = text[:-2] + "…"
    draw.text(xy, text, fill=INK, font=font, anchor=anchor)


def method_color(method: str) -> str:
    """The method's colour as '#RRGGBB' (a stable extra colour for names not in the registry)."""
    if method in METHODS:
        return METHODS[method].colour
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def method_label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _rgb(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))


# -- difference heat-maps (pillow)

# white → yellow → orange → red → dark red: 0 reads as "identical to FP" on a white page
_HEAT_ANCHORS = np.array([[255, 255, 255], [254, 224, 139], [253, 141, 60], [215, 48, 31], [127, 0, 0]], dtype=np.float64)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB, white (0) to dark red (1)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (v - low)[..., None]
    rgb = _HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac
    return rgb.round().astype(np.uint8)


def _abs_difference(samples: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """|x − x_ref| averaged over channels, in [0, 1] image units: [N, H, W]."""
    diff = (samples.detach().float().cpu().clamp(-1, 1) - reference.detach().float().cpu().clamp(-1, 1)).abs() / 2
    return diff.mean(1).numpy()


HEAT_VMAX = 0.25  # |x − FP| (in [0, 1] image units) drawn darkest red: one scale for every run, so runs compare


def difference_scale(samples: dict[str, torch.Tensor] | None = None, reference: str = "fp") -> float:
    """The colour-scale maximum of every heat-map: fixed (HEAT_VMAX), so a heat-map means the same
    thing from one run to the next (a scale fitted to each run made small errors look as red as large ones)."""
    return HEAT_VMAX


def difference_maps(samples: torch.Tensor, reference: torch.Tensor, vmax: float | None = None) -> np.ndarray:
    """Per-image heat-maps of |x − x_ref| (channel mean, [0, 1] units): [N, H, W, 3] uint8."""
    diff = _abs_difference(samples, reference)
    vmax = vmax if vmax is not None else max(float(diff.max()), 1e-6)
    return heat_colormap(diff / vmax)


def points_panel(points: torch.Tensor, size: int, extent: float = 3.0, reference: torch.Tensor | None = None,
                 color: str = "#1F77B4") -> Image.Image:
    """A scatter plot of 2-D samples on a square panel (reference points in light grey)."""
    panel = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(panel)

    def to_pixels(xy: torch.Tensor) -> np.ndarray:
        return ((xy.detach().float().cpu().numpy() / extent + 1) * 0.5 * (size - 1)).clip(0, size - 1)

    if reference is not None:
        for x, y in to_pixels(reference):
            draw.point((x, size - 1 - y), fill=(200, 200, 200))
    # Dots shrink as the cloud grows, so thousands of points still show the density's thin structure.
    radius = 2 if len(points) <= 256 else 1 if len(points) <= 1024 else 0
    for x, y in to_pixels(points):
        if radius:
            draw.ellipse((x - radius, size - 1 - radius - y, x + radius, size - 1 + radius - y), fill=_rgb(color))
        else:
            draw.point((x, size - 1 - y), fill=_rgb(color))
    draw.rectangle((0, 0, size - 1, size - 1), outline=(180, 180, 180))
    return panel


def comparison_grid(samples: dict[str, torch.Tensor], kind: str, scale: int = 3, column_titles: list[str] | None = None,
                    title: str | None = None, differences: bool = False) -> Image.Image:
    """One labelled row per method: its samples side by side (images upscaled `scale`× with
    nearest-neighbour so pixels stay visible), or one scatter panel for point models.

    With `differences`, every method but FP gets a second row under its samples: the per-image
    heat-map of |x − x_FP| (white = identical to FP), on one colour scale shared by all rows.
    """
    if kind != "image":
        return points_grid(samples, size=POINTS_PANEL, title=title)
    rows = []
    vmax = difference_scale(samples) if differences and "fp" in samples else None
    for method, batch in samples.items():
        label = method_label(method)
        images = to_uint8_images(batch)
        tiles = [Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST) for image in images]
        rows.append((label, tiles, method_color(method)))
        if vmax is not None and method != "fp":
            maps = difference_maps(batch, samples["fp"], vmax)
            rows.append(("  |x − FP|", [Image.fromarray(m).resize((m.shape[1] * scale, m.shape[0] * scale), Image.NEAREST) for m in maps], None))
    return _assemble(rows, column_titles, title, vmax)


def auto_scale(batch: torch.Tensor, target: int = 96, minimum: int = 2) -> int:
    """The nearest-neighbour upscaling that makes an image tile about `target` pixels high."""
    height = batch.shape[-2] if batch.dim() == 4 else target
    return max(minimum, round(target / max(height, 1)))


def run_title(result) -> str:
    """One line naming a comparison: model, bits, sampler, guidance (class-conditional models), seed."""
    cfg = result.config
    return (f"{result.model.name}  W{cfg.w_bits}A{cfg.a_bits}  {cfg.steps} steps  η={cfg.eta:g}"
            + (f"  guidance {cfg.guidance:g}" if result.model.conditional else "") + f"  seed {cfg.seed}")


def column_titles(result) -> list[str] | None:
    """The class name above each image column, for class-conditional models."""
    names = result.model.class_names
    if result.labels is None or not names:
        return None
    return [names[i] for i in result.labels.tolist()]


def result_grid(result, differences: bool = False) -> Image.Image:
    """A comparison's final samples, one labelled row per method (with `differences`, each
    method's heat-map row against FP under it)."""
    return comparison_grid(result.samples, result.model.kind, scale=auto_scale(result.samples["fp"]),
                           column_titles=column_titles(result), title=run_title(result), differences=differences)


def write_outputs(result, folder, differences: bool = False) -> list[Path]:
    """The files of a comparison, as `d2dpm compare --out` and the apps' downloads give them:
    grid.png, metrics.csv, per_image.csv, trajectory.csv, stats.csv, run.json.

    Written into a temporary folder beside `folder` (inside it when it exists already), then moved
    into place: a run that fails while writing leaves nothing half-written."""
    folder = Path(folder)
    writers = {
        "grid.png": lambda path: result_grid(result, differences).save(path, format="PNG"),
        "metrics.csv": lambda path: result.metrics.to_csv(path, index=False),
        "per_image.csv": lambda path: result.per_image.to_csv(path, index=False),
        "trajectory.csv": lambda path: result.trajectory.to_csv(path, index=False),
        "stats.csv": lambda path: result.stats_table.to_csv(path, index=False),
        "run.json": lambda path: path.write_text(json.dumps(result.run_info(), indent=2)),
    }
    existed = folder.is_dir()
    if not existed:
        folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder if existed else folder.parent))
    try:
        for name, write in writers.items():
            write(staging / name)
        if existed:
            for name in writers:
                os.replace(staging / name, folder / name)
            staging.rmdir()
        else:
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output folder is an ordinary one
            os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [folder / name for name in writers]


def points_extent(samples: dict[str, torch.Tensor], reference: str = "fp", minimum: float = 3.0) -> float:
    """A square half-width that holds the reference samples (at least `minimum`, the toy data's scale)."""
    points = samples.get(reference, next(iter(samples.values()))).detach().float().cpu().abs()
    finite = points[torch.isfinite(points)]
    return max(minimum, float(finite.quantile(0.99)) * 1.15) if finite.numel() else minimum


def points_grid(samples: dict[str, torch.Tensor], size: int = 240, title: str | None = None) -> Image.Image:
    """2-D samples: one square scatter panel per method, side by side, the method named above its
    panel in its colour; FP's samples in light grey behind every other panel."""
    extent = points_extent(samples)
    header = 26 if title else 0
    label_h = 22
    width = len(samples) * (size + PADDING) + PADDING
    if title:
        width = max(width, int(_font(16).getlength(_text(title, _font(16)))) + 2 * PADDING)
    grid = Image.new("RGB", (width, header + label_h + size + 2 * PADDING), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        _draw_text(draw, (PADDING, PADDING), title, 16)
    for index, (method, batch) in enumerate(samples.items()):
        x = PADDING + index * (size + PADDING)
        y = header + PADDING
        draw.rectangle((x, y + 5, x + 11, y + 16), fill=method_color(method))
        _draw_text(draw, (x + 17, y + 11), method_label(method), 14, anchor="lm", max_width=size - 20)
        panel = points_panel(batch, size, extent, reference=samples.get("fp") if method != "fp" else None, color=method_color(method))
        grid.paste(panel, (x, y + label_h))
    return grid


def labelled_image_rows(rows: dict[str, torch.Tensor], scale: int = 3, title: str | None = None) -> Image.Image:
    """Image batches as rows under plain text labels (e.g. one row per class), no method colours."""
    tiles = {label: [Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
                     for image in to_uint8_images(batch)] for label, batch in rows.items()}
    return _assemble([(label, row, None) for label, row in tiles.items()], None, title)


COLORBAR_WIDTH = 140


def _assemble(rows: list[tuple[str, list[Image.Image], str | None]], column_titles: list[str] | None, title: str | None,
              heat_vmax: float | None = None) -> Image.Image:
    """Rows of equal tiles with a label column (a colour swatch for method rows), optional titles,
    and a colour bar for the heat-maps when `heat_vmax` is given."""
    tile_w, tile_h = rows[0][1][0].size
    columns = max(len(tiles) for _, tiles, _ in rows)
    header = 0
    if title:
        header += 26
    if heat_vmax is not None:
        header += 22
    if column_titles:
        header += 18
    width = LABEL_WIDTH + columns * (tile_w + PADDING) + PADDING
    if title:
        width = max(width, int(_font(16).getlength(_text(title, _font(16)))) + 2 * PADDING)
    if heat_vmax is not None:
        width = max(width, 2 * PADDING + 130 + COLORBAR_WIDTH + 230)
    height = header + len(rows) * (tile_h + PADDING) + PADDING
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    y = PADDING
    if title:
        _draw_text(draw, (PADDING, y), title, 16)
        y += 26
    if heat_vmax is not None:
        legend = "heat-maps |x − FP|:"
        _draw_text(draw, (PADDING, y + 6), legend, 12, anchor="lm")
        x0 = PADDING + int(_font(12).getlength(_text(legend, _font(12)))) + 8
        ramp = heat_colormap(np.linspace(0, 1, COLORBAR_WIDTH))[None].repeat(12, axis=0)
        grid.paste(Image.fromarray(ramp), (x0, y))
        draw.rectangle((x0, y, x0 + COLORBAR_WIDTH - 1, y + 11), outline=(160, 160, 160))
        _draw_text(draw, (x0 + COLORBAR_WIDTH + 6, y + 6), f"0 (same as FP) → ≥ {heat_vmax:.2f} of the range", 12, anchor="lm")
        y += 22
    if column_titles:
        for index, text in enumerate(column_titles[:columns]):
            _draw_text(draw, (LABEL_WIDTH + index * (tile_w + PADDING) + tile_w // 2, y), text, 11, anchor="mt", max_width=tile_w)
        y += 18
    for label, tiles, color in rows:
        if color is not None:
            draw.rectangle((PADDING, y + tile_h // 2 - 6, PADDING + 11, y + tile_h // 2 + 5), fill=color)
            _draw_text(draw, (PADDING + 17, y + tile_h // 2), label, 15, anchor="lm", max_width=LABEL_WIDTH - 20)
        else:
            _draw_text(draw, (PADDING, y + tile_h // 2), label, 12, anchor="lm", max_width=LABEL_WIDTH - 6)
        for index, tile in enumerate(tiles):
            grid.paste(tile, (LABEL_WIDTH + index * (tile_w + PADDING), y))
        y += tile_h + PADDING
    return grid


def step_images(result, step: int, scale: int = 3, what: str = "x0") -> Image.Image:
    """The predicted x_0 (or x_t) of every method after step `step` (0-based) as a labelled grid."""
    records = result.records[step]
    samples = {name: getattr(record, what) for name, record in records.items()}
    t = next(iter(records.values())).t
    return comparison_grid(samples, result.model.kind, scale=scale,
                           title=f"predicted x₀ after step {step + 1}/{len(result.records)} (t = {t})" if what == "x0" else None)


# -- plotly: every curve of both UIs

_LAYOUT = dict(template="plotly_white", font=dict(family="Inter, DejaVu Sans, sans-serif", size=13),
               margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", yanchor="bottom", y=1.04, x=0))
QUANTITY_COLORS = {
    "mu_delta": "#D55E00", "sigma_delta": "#E69F00", "sigma_cond": "#0072B2", "rho": "#CC79A7",
    "sigma_t": "#222222", "sigma_t_prime": "#0072B2", "k_t": "#009E73",
}


def _go():
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    return go, make_subplots


def _shade_unabsorbed(fig, table, rows_cols) -> None:
    """Grey bands over the steps where D-D² could not absorb the residual variance (k_t²σ_cond² ≥ σ_t²)."""
    steps = table.loc[~table["variance_absorbed"].astype(bool), "step"].tolist()
    # merge consecutive steps into bands
    bands, start, prev = [], None, None
    for s in steps:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            bands.append((start, prev))
            start = prev = s
    if start is not None:
        bands.append((start, prev))
    for row, col in rows_cols:
        for a, b in bands:  # plotted steps are 1-based
            fig.add_vrect(x0=a + 0.5, x1=b + 1.5, fillcolor="#9E9E9E", opacity=0.13, line_width=0, row=row, col=col)


CHANNEL_COLORS = {1: ["#0072B2"], 2: ["#0072B2", "#56B4E9"], 3: ["#D62728", "#2CA02C", "#1F77B4"]}


def sigma_prime_columns(table) -> list[tuple[str, str, str]]:
    """(column, legend name, colour) of the σ_t' that D-D² applied, as the statistics table holds it:
    one tensor-wise column, or one per channel (red, green, blue for RGB images)."""
    if "sigma_t_prime" in table:
        return [("sigma_t_prime", "σ_t' (D-D², tensor-wise)", QUANTITY_COLORS["sigma_t_prime"])]
    columns = sorted((c for c in table.columns if c.startswith("sigma_t_prime_c")), key=lambda c: int(c[len("sigma_t_prime_c"):]))
    colors = CHANNEL_COLORS.get(len(columns), [QUANTITY_COLORS["sigma_t_prime"]] * len(columns))
    names = {3: ["R", "G", "B"], 2: ["x", "y"]}.get(len(columns), [str(c) for c in range(len(columns))])
    return [(column, f"σ_t' (D-D², channel {name})", color) for column, name, color in zip(columns, names, colors)]


def identity_steps(table) -> list[int]:
    """0-based steps whose update leaves x unchanged (ᾱ_prev = ᾱ_t: k_t = 0 and σ_t = 0), the last
    step t = 0 of the shipped schedules: a deviation of ε there cannot reach the sample."""
    scale = float(table["k_t"].abs().max()) or 1.0
    mask = (table["k_t"].abs() <= 1e-6 * scale) & (table["sigma_t"].abs() <= 1e-12)
    return [int(s) for s in table.loc[mask, "step"]]


def _bottom_legend(fig, height: int, bottom: int = 150, top: int = 90) -> None:
    """Legend at the bottom of the figure, title above the panels: a legend between the title and the
    panels covered the title as soon as the figure was narrower than the legend. Placed against the
    figure's own bottom edge (yref container), so no resize of the plot area can move it onto a panel."""
    fig.update_layout(legend=dict(orientation="h", yref="container", y=0.01, yanchor="bottom", x=0, xanchor="left"),
                      margin=dict(l=64, r=20, t=top, b=bottom), height=height)


def deviation_figure(stats_table, title: str | None = None):
    """Per-step curves of the noise model: μ_Δ, σ_Δ, σ_cond; ρ; σ_t vs D-D²'s σ_t'; k_t.

    σ_t' is the one D-D² applied in the run, at its granularity (one line per channel when
    channel-wise). Grey bands: steps where the residual variance could not be absorbed in full
    (all of them at η = 0). Hatched: identity steps (the last one, t = 0), whose deviation
    cannot reach the sample.
    """
    go, make_subplots = _go()
    t = stats_table
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.16, horizontal_spacing=0.12,
                        subplot_titles=("quantization noise Δ: mean and spread", "correlation ρ(ε̂, Δ)",
                                        "step noise: σ_t and D-D²'s σ_t'", "k_t: gain of an ε error on x_prev"))
    custom = t[["t"]].to_numpy()
    hover = "step %{x} (t = %{customdata[0]})<br>%{y:.4g}"

    def line(y, name, row, col, dash=None, key=None):
        fig.add_trace(go.Scatter(x=t["step"] + 1, y=t[y], name=name, mode="lines+markers", customdata=custom, hovertemplate=hover,
                                 line=dict(color=QUANTITY_COLORS[key or y], dash=dash, width=2.5), marker=dict(size=5)), row=row, col=col)

    line("mu_delta", "μ_Δ (mean deviation)", 1, 1)
    line("sigma_delta", "σ_Δ (variance deviation)", 1, 1)
    line("sigma_cond", "σ_cond = σ_Δ√(1−ρ²)", 1, 1, dash="dot")
    line("rho", "ρ", 1, 2)
    line("sigma_t", "σ_t (DDIM)", 2, 1)
    for column, name, color in sigma_prime_columns(t):
        fig.add_trace(go.Scatter(x=t["step"] + 1, y=t[column], name=name, mode="lines+markers", customdata=custom, hovertemplate=hover,
                                 line=dict(color=color, dash="dash", width=2.5), marker=dict(size=5)), row=2, col=1)
    line("k_t", "k_t", 2, 2)
    fig.add_hline(y=0, line_width=1, line_color="#BBBBBB", row=1, col=2)
    _shade_unabsorbed(fig, t, [(1, 1), (1, 2), (2, 1), (2, 2)])
    unabsorbed = ~t["variance_absorbed"].astype(bool)
    if unabsorbed.any():
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="variance not absorbed (grey)",
                                 marker=dict(size=12, symbol="square", color="rgba(158,158,158,0.45)")), row=1, col=1)
    identity = identity_steps(t)
    for step in identity:
        for row, col in [(1, 1), (1, 2), (2, 1), (2, 2)]:
            fig.add_vrect(x0=step + 0.5, x1=step + 1.5, fillcolor="rgba(0,114,178,0.07)", line=dict(color="#0072B2", width=1, dash="dot"),
                          row=row, col=col)
    if identity:
        last = identity[-1]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                                 name=f"step {last + 1} (t = {int(t['t'].iloc[last])}): identity, cannot affect the sample",
                                 marker=dict(size=12, symbol="square-open", color="#0072B2")), row=1, col=1)
    if unabsorbed.all() and float(t["sigma_t"].abs().max()) == 0.0:
        fig.add_annotation(text="η = 0: σ_t = 0 at every step, so there is no step noise<br>to absorb the residual variance into",
                           xref="x3 domain", yref="y3 domain", x=0.5, y=0.5, showarrow=False, font=dict(size=12, color="#555555"),
                           bgcolor="rgba(255,255,255,0.8)")
    fig.update_xaxes(title_text="sampling step (1 = noisiest)", row=2, col=1)
    fig.update_xaxes(title_text="sampling step (1 = noisiest)", row=2, col=2)
    fig.update_yaxes(title_text="Δ (ε units)", row=1, col=1)
    fig.update_yaxes(title_text="ρ", row=1, col=2)
    fig.update_yaxes(title_text="σ (x units)", row=2, col=1)
    fig.update_yaxes(title_text="k_t", row=2, col=2)
    fig.update_layout(**_LAYOUT)
    fig.update_layout(title=dict(text=title or "Per-step quantization noise", x=0, y=0.98, yanchor="top"))
    _bottom_legend(fig, 760, bottom=170)
    return fig


def _pairs(stats, step: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = stats.pair_sample[step].float().numpy()
    keep = np.isfinite(pairs).all(0)
    return pairs[0][keep], pairs[1][keep]


def _check_step(stats, step: int) -> int:
    from .errors import check_int_range

    return check_int_range("step", step, 0, len(stats.timesteps) - 1)


def delta_histogram_figure(stats, step: int):
    """The paper's Figure 2 (left): histogram of Δ at one step, with the Gaussian N(μ_Δ, σ_Δ²) fit."""
    go, _ = _go()
    step = _check_step(stats, step)
    _, delta = _pairs(stats, step)
    mu, sd = float(stats.tensor["mu_y"][step]), float(stats.tensor["var_y"][step].sqrt())
    grid = np.linspace(mu - 4.5 * sd, mu + 4.5 * sd, 200)
    pdf = np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=delta, histnorm="probability density", nbinsx=60, name="Δ = ε̂ − ε (samples)",
                               marker=dict(color="rgba(213,94,0,0.55)", line=dict(color="white", width=0.5))))
    fig.add_trace(go.Scatter(x=grid, y=pdf, mode="lines", name=f"Gaussian fit N({mu:.3g}, {sd:.3g}²)", line=dict(color="#222222", width=2.5)))
    fig.add_vline(x=mu, line_dash="dash", line_color="#D55E00")
    fig.update_layout(**_LAYOUT, height=400, bargap=0.02,
                      title=dict(text=f"Δ at step {step + 1} (t = {stats.timesteps[step]})", x=0, y=0.97),
                      xaxis_title="Δ (quantized − full-precision output)", yaxis_title="density")
    fig.update_layout(margin=dict(l=60, r=20, t=90, b=50))
    return fig


def joint_density_figure(stats, step: int):
    """The paper's Figure 2 (right): joint density of (ε̂, Δ) at one step, with the conditional
    mean μ_cond(ε̂) = μ_Δ + ρ σ_Δ/σ_ε̂ (ε̂ − μ_ε̂) and the ±σ_cond band D²-DPM uses."""
    go, _ = _go()
    step = _check_step(stats, step)
    eps_hat, delta = _pairs(stats, step)
    fit = stats.tensor
    mu_x, mu_y = float(fit["mu_x"][step]), float(fit["mu_y"][step])
    sx, sy = float(fit["var_x"][step].sqrt()), float(fit["var_y"][step].sqrt())
    rho = float(stats.rho("tensor")[step])
    s_cond = float(stats.sigma_cond("tensor")[step])
    x = np.linspace(mu_x - 3.5 * sx, mu_x + 3.5 * sx, 100)
    line = mu_y + rho * sy / sx * (x - mu_x)
    fig = go.Figure()
    fig.add_trace(go.Histogram2dContour(x=eps_hat, y=delta, colorscale="Blues", showscale=False, ncontours=14,
                                        contours=dict(coloring="fill", showlines=False), name="density", hoverinfo="skip"))
    shown = min(len(eps_hat), 800)
    fig.add_trace(go.Scatter(x=eps_hat[:shown], y=delta[:shown], mode="markers", name="(ε̂, Δ) pairs",
                             marker=dict(size=3, color="rgba(34,34,34,0.35)")))
    fig.add_trace(go.Scatter(x=x, y=line, mode="lines", name=f"μ_cond(ε̂), ρ = {rho:.2f}", line=dict(color="#D55E00", width=3)))
    for sign in (1, -1):
        fig.add_trace(go.Scatter(x=x, y=line + sign * s_cond, mode="lines", showlegend=sign == 1, name="± σ_cond",
                                 line=dict(color="#D55E00", width=1.5, dash="dot")))
    fig.update_layout(**_LAYOUT, height=400, title=dict(text=f"(ε̂, Δ) at step {step + 1} (t = {stats.timesteps[step]})", x=0, y=0.97),
                      xaxis_title="ε̂ (quantized output)", yaxis_title="Δ")
    fig.update_layout(margin=dict(l=60, r=20, t=90, b=50))
    lo, hi = np.percentile(delta, [0.5, 99.5]) if len(delta) else (-1, 1)
    pad = 0.15 * (hi - lo + 1e-9)
    fig.update_yaxes(range=[lo - pad, hi + pad])
    fig.update_xaxes(range=[x[0], x[-1]])
    return fig


def _method_lines(fig, go, table, y: str, row: int | None = None, col: int | None = None, legend: bool = True, dash=None,
                  x_offset: int = 1) -> None:
    # FP is drawn last and the oracle dashed: the oracle's line lies on FP's and used to hide it.
    order = [m for m in table["method"].unique() if m != "fp"] + (["fp"] if (table["method"] == "fp").any() else [])
    for method in order:
        group = table[table["method"] == method]
        kwargs = dict(row=row, col=col) if row is not None else {}
        line = dict(color=method_color(method), width=2.5, dash=dash or ("dash" if method == "oracle" else None))
        if method == "fp":
            line.update(width=1.5)
        fig.add_trace(go.Scatter(x=group["step"] + x_offset, y=group[y], mode="lines+markers", name=method_label(method), legendgroup=method,
                                 showlegend=legend, customdata=group[["t"]].to_numpy(),
                                 hovertemplate=method_label(method) + ": %{y:.4g}<br>step %{x} (t = %{customdata[0]})<extra></extra>",
                                 line=line, marker=dict(size=4 if method == "fp" else 5)), **kwargs)


def trajectory_figure(trajectory, log_y: bool = True, title: str | None = None):
    """RMSE to the FP trajectory per method and step: of x after each step (every method starts from
    the same x_T, so before step 1 the distance is 0, which a log axis cannot show), and of the predicted x_0."""
    go, make_subplots = _go()
    table = trajectory[trajectory["method"] != "fp"]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("RMSE of x after each step to FP's", "RMSE of the predicted x₀ to FP's"))
    _method_lines(fig, go, table, "rmse_x_prev", 1, 1)
    _method_lines(fig, go, table, "rmse_x0", 1, 2, legend=False)
    fig.update_xaxes(title_text="sampling step (1 = noisiest)")
    fig.update_yaxes(title_text="RMSE to FP", row=1, col=1)
    fig.update_yaxes(title_text="RMSE to FP", row=1, col=2)
    if log_y and (table[["rmse_x_prev", "rmse_x0"]] > 0).all().all():
        # powers of ten with 2 and 5 between them, as plain numbers: never more labels than fit
        fig.update_yaxes(type="log", dtick="D2", tickformat="~g")
    fig.update_layout(**_LAYOUT)
    fig.update_layout(title=dict(text=title or "Distance to the full-precision trajectory", x=0, y=0.98, yanchor="top"))
    _bottom_legend(fig, 470)
    return fig


def moments_figure(trajectory, title: str | None = None):
    """Mean and standard deviation of x_t per method and step (a mean shift shows as a drifting
    mean; excess variance as a std that stays above FP's)."""
    go, make_subplots = _go()
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=("mean of x_t", "std of x_t"))
    _method_lines(fig, go, trajectory, "mean_xt", 1, 1)
    _method_lines(fig, go, trajectory, "std_xt", 1, 2, legend=False)
    fig.update_xaxes(title_text="sampling step (1 = noisiest)")
    fig.update_yaxes(title_text="mean", row=1, col=1)
    fig.update_yaxes(title_text="std", row=1, col=2)
    fig.update_layout(**_LAYOUT)
    fig.update_layout(title=dict(text=title or "Mean and spread of x_t", x=0, y=0.98, yanchor="top"))
    _bottom_legend(fig, 450)
    return fig


def metrics_figure(metrics, kind: str = "image"):
    """Distance of each method's final samples to FP's: PSNR (bars, ± std over images; higher is
    closer) for images, MSE (lower is closer) for points. A bar far above the others (the oracle's
    ~90 dB) is cut at the top with its value written on it, so the others stay readable."""
    go, _ = _go()
    table = metrics[metrics["method"] != "fp"]
    points = kind == "points"
    column = "mse_to_fp" if points else "psnr_to_fp"
    values = table[column].astype(float).to_numpy()
    others = [v for m, v in zip(table["method"], values) if m != "oracle" and np.isfinite(v)]
    top = max(others) * 1.25 if others and max(others) > 0 else None
    shown = [min(v, top) if top is not None and m == "oracle" else v for m, v in zip(table["method"], values)]
    unit = "" if points else " dB"
    text = [f"{v:.3g}{unit}" + (" ↑" if top is not None and m == "oracle" and v > top else "") for m, v in zip(table["method"], values)]
    fig = go.Figure(go.Bar(x=[method_label(m) for m in table["method"]], y=shown, text=text, textposition="inside",
                           error_y=None if points else dict(type="data", array=table["psnr_std"], visible=True),
                           marker_color=[method_color(m) for m in table["method"]],
                           hovertemplate="%{x}: %{text}<extra></extra>"))
    fig.update_layout(**_LAYOUT, height=320, showlegend=False,
                      title=dict(text="MSE to FP (lower = closer)" if points else "PSNR to FP (higher = closer)", x=0),
                      yaxis_title="MSE" if points else "dB")
    if top is not None and (np.asarray(values) > top).any():
        fig.update_yaxes(range=[0, top])
    return fig


def _toy_density_grid(extent: float, n: int = 120):
    """The toy mixture's exact density on an n × n grid over [−extent, extent]²."""
    from .toy import toy2d_log_density

    axis = np.linspace(-extent, extent, n)
    xx, yy = np.meshgrid(axis, axis)
    points = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float32)
    with torch.no_grad():
        density = toy2d_log_density(points).exp().numpy().reshape(n, n)
    return axis, density


HIGHLIGHTED_PATHS = 3  # trajectories drawn per method in the toy2d view unless all are asked for
MAX_PATHS = 256
MAX_MOVING_POINTS = 600  # points per method that move in the animation (the rest only as end points)


def particles_figure(result, paths: int | None = HIGHLIGHTED_PATHS, extent: float | None = None):
    """toy2d in the style of Diffusion Explorer: the known data density as filled contours, where
    each method's samples ended, and a handful of highlighted trajectories (`paths`; None for all,
    up to MAX_PATHS). A plotly animation: one frame per step (press play or drag the slider)."""
    go, _ = _go()
    methods = list(result.records[0].keys())
    steps = len(result.records)
    total = result.records[0][methods[0]].x_t.shape[0]
    n_moving = min(total, MAX_MOVING_POINTS)
    n_paths = min(total, MAX_PATHS if paths is None else max(int(paths), 0))
    states = {}
    for m in methods:
        seq = [r[m].x_t[:n_moving] for r in result.records] + [result.records[-1][m].x_prev[:n_moving]]
        states[m] = torch.stack(seq).detach().float().cpu().numpy()  # [steps + 1, n, 2]
    if extent is None:
        finals = np.concatenate([p[-1] for p in states.values()])
        finite = finals[np.isfinite(finals).all(1)]
        extent = float(min(max(np.percentile(np.abs(finite), 99) * 1.15, 2.5), 6.0)) if len(finite) else 3.0
    fig = go.Figure()
    axis, values = _toy_density_grid(extent)
    # log density over the 6 nats below its peak: the ring and spiral are thin, a linear scale hid them
    log_density = np.log(np.maximum(values.astype(np.float64), 1e-300))
    peak = float(log_density.max())
    fig.add_trace(go.Contour(x=axis, y=axis, z=np.maximum(log_density, peak - 6.0), colorscale=[[0, "#FFFFFF"], [0.3, "#DCE6F2"], [1, "#7FA6D1"]],
                             showscale=False, contours=dict(coloring="fill", showlines=True, start=peak - 5.0, end=peak, size=1.0),
                             line=dict(width=0.5, color="#A9BFD6"), hoverinfo="skip", name="data density (known)",
                             showlegend=True))
    background = len(fig.data)
    marker_size = 4 if n_moving > 256 else 6

    def traces(k: int):
        out = []
        for m in methods:
            color = method_color(m)
            p = states[m][: k + 1]
            xs, ys = [], []
            for i in range(n_paths):
                xs += list(p[:, i, 0]) + [None]
                ys += list(p[:, i, 1]) + [None]
            out.append(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=1.2 if paths is not None else 0.6),
                                  opacity=0.75 if paths is not None else 0.3, legendgroup=m, showlegend=False, hoverinfo="skip"))
            out.append(go.Scatter(x=p[-1, :, 0], y=p[-1, :, 1], mode="markers", name=method_label(m), legendgroup=m,
                                  marker=dict(color=color, size=marker_size, opacity=0.75, line=dict(width=0)),
                                  hovertemplate=method_label(m) + ": (%{x:.2f}, %{y:.2f})<extra></extra>"))
        return out

    for trace in traces(steps):
        fig.add_trace(trace)
    animated = list(range(background, len(fig.data)))
    fig.frames = [go.Frame(data=traces(k), traces=animated, name=str(k)) for k in range(steps + 1)]
    slider = dict(active=steps, currentvalue=dict(prefix="after step "), pad=dict(t=50),
                  steps=[dict(label=str(k), method="animate", args=[[str(k)], dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
                         for k in range(steps + 1)])
    shown = "all trajectories" if paths is None else f"{n_paths} highlighted trajectories per method"
    fig.update_layout(**_LAYOUT)
    fig.update_layout(height=620, sliders=[slider],
                      updatemenus=[dict(type="buttons", showactive=False, x=0, y=-0.1, xanchor="left", yanchor="top",
                                        buttons=[dict(label="▶ play", method="animate",
                                                      args=[[str(k) for k in range(steps + 1)], dict(frame=dict(duration=250, redraw=True), fromcurrent=False, transition=dict(duration=0))])])],
                      title=dict(text=f"Where each method's points end, over the known density ({shown}; "
                                      "click a legend entry to hide a method)", x=0, font=dict(size=14)),
                      legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0),
                      margin=dict(l=60, r=20, t=110, b=130))
    fig.update_xaxes(range=[-extent, extent], constrain="domain", title_text="x₁")
    fig.update_yaxes(range=[-extent, extent], scaleanchor="x", title_text="x₂")
    return fig
