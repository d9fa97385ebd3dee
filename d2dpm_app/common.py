"""What both UIs share and neither may compute twice: turning widget values into a
`CompareConfig`, the CPU budget, the model summary, display tables, downloads and captions.

No UI library is imported here; `gradio_ui` and `streamlit_ui` are thin layers over it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from d2dpm.corrections import METHODS, method_for_switches
from d2dpm.errors import ConfigError, check_int_range
from d2dpm.experiment import DEFAULT_CALIB_SAMPLES, MAX_IMAGES, MAX_POINTS, CompareConfig, ComparisonResult, default_workbench
from d2dpm.figures import auto_scale, comparison_grid, method_label, result_grid, run_title, step_images, write_outputs

DEFAULT_MODEL = os.environ.get("D2DPM_APP_MODEL", "emoji")
MODEL_CHOICES = ["emoji", "fashion", "toy2d"]
PRESETS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A6": (4, 6)}
DEFAULT_PRESET = "W4A8"
MODES = {"S-D²": "stochastic", "D-D²": "deterministic"}
ALL_CLASSES = "all classes (one image each, cycling)"

# The CPU budget: images × method rows × steps ("image-steps"). Each image-step is one image
# through one network at one step; the default comparison (8 images, 5 rows, 20 steps) is 800.
# 2,400 keeps a comparison of the embedded models to seconds on a 2-core Space. Operators with
# more hardware raise it with the environment variable D2DPM_MAX_IMAGE_STEPS.
MAX_IMAGE_STEPS = int(os.environ.get("D2DPM_MAX_IMAGE_STEPS", "2400"))
MAX_UI_STEPS = 100
MAX_CALIB_SAMPLES = 512
# A toy2d point goes through a 128-wide MLP: hundreds of them cost less than one 32×32 image through
# the UNet, so a point counts as 1/POINTS_PER_IMAGE of an image-step and clouds of thousands fit.
POINTS_PER_IMAGE = 256


@dataclass(frozen=True)
class SampleCount:
    """The "how many samples" control for a kind of model: images, or toy points."""

    label: str
    maximum: int
    default: int


SAMPLE_COUNTS = {"image": SampleCount("Images", min(MAX_IMAGES, 32), 8), "points": SampleCount("Points", MAX_POINTS, 1000)}

PAPER_URL = "https://arxiv.org/abs/2501.08180"
CODE_URL = "https://github.com/TaylorJocelyn/D2-DPM"


@dataclass
class ModelSummary:
    """What the controls need to know about a model (or why it cannot be used)."""

    spec: str
    ok: bool
    kind: str = "image"
    conditional: bool = False
    class_names: list[str] = field(default_factory=list)
    shape: tuple = ()
    message: str = ""

    def class_choices(self) -> list[str]:
        return [ALL_CLASSES] + [f"{i}: {name}" for i, name in enumerate(self.class_names)]


def describe_model(spec: str) -> ModelSummary:
    """Load a model (cached by the core) and summarise it; a missing or bad model gives ok=False
    and a message saying what to do, never an exception."""
    spec = (spec or "").strip() or DEFAULT_MODEL
    try:
        model = default_workbench().model(spec)
    except ConfigError as error:
        if spec in MODEL_CHOICES:
            message = (f"The embedded model '{spec}' is not installed here (assets/models/{spec} is missing). "
                       "Train it with `d2dpm train` (see the README), or type the path of a diffusers model folder in the model box.")
        else:
            message = f"Model not available: {error.given!r}. Allowed: {error.allowed}."
        return ModelSummary(spec, False, message=message)
    except Exception as error:  # a folder that is not a model: say so, keep serving
        return ModelSummary(spec, False, message=f"Could not load model {spec!r}: {type(error).__name__}: {error}")
    names = list(model.class_names) if model.class_names else [f"class {i}" for i in range(model.num_classes or 0)]
    what = "2-D points" if model.kind == "points" else "×".join(map(str, model.sample_shape)) + " images"
    cond = f", class-conditional ({model.num_classes} classes)" if model.conditional else ", unconditional"
    return ModelSummary(spec, True, model.kind, model.conditional, names, tuple(model.sample_shape),
                        message=f"**{model.name}**: {what}{cond}")


def parse_class(choice, conditional: bool) -> int | None:
    """"all classes…" / None / "" → None; "3: cat" or 3 → 3."""
    if not conditional or choice is None or choice == "" or choice == ALL_CLASSES:
        return None
    if isinstance(choice, str):
        head = choice.split(":", 1)[0].strip()
        return check_int_range("class", head, 0, 10**6)
    return check_int_range("class", choice, 0, 10**6)


def methods_from_switches(mean: bool, variance: bool, modes, ptqd: bool, oracle: bool) -> tuple[str, ...]:
    """The method rows the toggles select: FP and the quantized model always, then PTQD, the
    D² variants of each chosen mode (deduplicated: with the variance off S and D coincide), the oracle."""
    rows = ["fp", "q"]
    if ptqd:
        rows.append("ptqd")
    for mode_label in modes or ():
        if mode_label not in MODES:
            raise ConfigError("mode", mode_label, " or ".join(MODES))
        name = method_for_switches(bool(mean), bool(variance), MODES[mode_label])
        if name is not None:
            rows.append(name)
    if oracle:
        rows.append("oracle")
    return tuple(dict.fromkeys(rows))


def check_budget(num_images: int, methods: tuple[str, ...], steps: int, kind: str = "image") -> float:
    """Samples × method rows × steps must stay within MAX_IMAGE_STEPS (the documented CPU cap);
    toy points count POINTS_PER_IMAGE to an image."""
    per_image = POINTS_PER_IMAGE if kind == "points" else 1
    work = int(num_images) / per_image * len(methods) * int(steps)
    if work > MAX_IMAGE_STEPS:
        what = f"{num_images} points (= {num_images / per_image:g} images)" if kind == "points" else f"{num_images} images"
        raise ConfigError(
            "num_images",
            f"{what} × {len(methods)} methods × {steps} steps = {work:g} image-steps",
            f"at most {MAX_IMAGE_STEPS} image-steps on this CPU (fewer samples, steps or methods)",
        )
    return work


def build_config(model: str, w_bits, a_bits, steps, eta, guidance, class_choice, seed, num_images,
                 mean: bool = True, variance: bool = True, modes=("S-D²", "D-D²"), ptqd: bool = True, oracle: bool = False,
                 calib_samples=DEFAULT_CALIB_SAMPLES, granularity: str = "channel") -> CompareConfig:
    """Widget values → a validated-enough CompareConfig (the core validates the rest). Raises ConfigError."""
    summary = describe_model(model)
    if not summary.ok:
        raise ConfigError("model", summary.spec, summary.message)
    steps = check_int_range("steps", steps, 1, MAX_UI_STEPS)
    num_images = check_int_range("num_images", num_images, 1, SAMPLE_COUNTS[summary.kind].maximum)
    calib_samples = check_int_range("calib_samples", calib_samples, 2, MAX_CALIB_SAMPLES)
    methods = methods_from_switches(mean, variance, modes, ptqd, oracle)
    check_budget(num_images, methods, steps, summary.kind)
    if guidance is None or (isinstance(guidance, float) and math.isnan(guidance)) or not summary.conditional:
        guidance = None  # unconditional models sample without guidance (the control is hidden for them)
    return CompareConfig(
        model=summary.spec,
        w_bits=_int_or_raw(w_bits),
        a_bits=_int_or_raw(a_bits),
        steps=steps,
        eta=eta,
        guidance=guidance,
        class_label=parse_class(class_choice, summary.conditional),
        methods=methods,
        seed=_int_or_raw(seed),
        num_images=num_images,
        calib_samples=calib_samples,
        granularity=granularity,
    )


def _int_or_raw(value):
    """Sliders and number boxes send 4.0 for 4; keep anything else as given for the core to reject."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- what a run shows

SOURCE_TEXT = {
    "shipped": "shipped statistics (precomputed, instant)",
    "cache": "statistics from this server's cache",
    "calibrated": "statistics calibrated just now (cached for the next visitor)",
}


def final_grid(result: ComparisonResult):
    """Rows FP | quantized | corrections, each correction with its heat-map row against FP."""
    return result_grid(result, differences=True)


def progress_grid(x0: dict, kind: str, step: int, total: int):
    return comparison_grid(x0, kind, scale=auto_scale(next(iter(x0.values()))),
                           title=f"sampling… step {step}/{total}: each method's predicted x₀")


def step_grid(result: ComparisonResult, step: int):
    """The predicted x₀ of every method after `step` (0-based), tiles as large as the final grid's."""
    return step_images(result, step, scale=auto_scale(result.samples["fp"]))


METRIC_COLUMNS = ["method", "bits", "PSNR to FP (dB)", "MSE to FP", "size (MB)", "GBOPs", "compression ×", "BOP ratio ×"]


def metrics_display(metrics: pd.DataFrame | None) -> pd.DataFrame:
    """The metrics table as students read it: rounded, named columns, FP's PSNR as '—' (empty before a run)."""
    rows = []
    if metrics is None:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    for _, r in metrics.iterrows():
        fp = r["method"] == "fp"
        psnr = "—" if fp or not math.isfinite(r["psnr_to_fp"]) else f"{r['psnr_to_fp']:.2f} ± {r['psnr_std']:.2f}"
        rows.append({
            "method": r["label"],
            "bits": r["bits"],
            "PSNR to FP (dB)": psnr,
            "MSE to FP": f"{r['mse_to_fp']:.2e}" if not fp else "0",
            "size (MB)": f"{r['size_mb']:.4g}",
            "GBOPs": f"{r['gbops']:.4g}",
            "compression ×": f"{r['compression']:.2f}",
            "BOP ratio ×": f"{r['bop_ratio']:.2f}",
        })
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def efficiency_line(result: ComparisonResult) -> str:
    e = result.efficiency.as_dict()
    return (f"Model size {e['fp_size_mb']:.4g} → {e['q_size_mb']:.4g} MB ({e['compression']:.2f}× smaller); "
            f"BOPs {e['fp_gbops']:.4g} → {e['q_gbops']:.4g} G per network evaluation ({e['bop_ratio']:.1f}× fewer).")


def summary_markdown(result: ComparisonResult, seconds: float | None = None) -> str:
    best = result.metrics[result.metrics["method"] != "fp"].sort_values("psnr_to_fp", ascending=False)
    lines = [f"**{run_title(result)}**, {SOURCE_TEXT.get(result.stats_source, 'statistics from ' + str(result.stats_source))}"
             + (f", {seconds:.1f} s." if seconds is not None else ".")]
    if len(best) and result.model.kind == "image":
        top = best.iloc[0]
        q = result.metrics[result.metrics["method"] == "q"]
        if len(q):
            lines.append(f"Closest to FP: **{top['label']}** ({top['psnr_to_fp']:.2f} dB) vs the uncorrected quantized model "
                         f"({float(q['psnr_to_fp'].iloc[0]):.2f} dB).")
    lines.append(efficiency_line(result))
    return "  \n".join(lines)


def write_downloads(result: ComparisonResult, folder: Path) -> list[Path]:
    """The grid PNG (with its difference rows) and the per-step tables as CSV: the files and names of `d2dpm compare --out`."""
    return write_outputs(result, folder, differences=True)


def step_caption(result: ComparisonResult, step: int) -> str:
    t = result.records[step][next(iter(result.records[step]))].t
    rows = result.trajectory[result.trajectory["step"] == step]
    parts = [f"{method_label(r['method'])} {r['rmse_x0']:.3f}" for _, r in rows.iterrows() if r["method"] != "fp"]
    return f"Step {step + 1}/{len(result.records)} (t = {t}). RMSE of predicted x₀ to FP: " + ", ".join(parts)


def stats_caption(result: ComparisonResult, step: int) -> str:
    row = result.stats_table.iloc[step]
    if bool(row["variance_absorbed"]):
        absorbed = "absorbed into σ_t'"
    elif row["sigma_t"] == 0:
        absorbed = "not absorbable (σ_t = 0: no step noise to take it from; D-D² only removes the mean here)"
    else:
        absorbed = "only partly absorbable (k_t²σ_cond² ≥ σ_t²: σ_t' is clamped to 0, the step's own noise is dropped)"
    return (f"Step {step + 1} (t = {int(row['t'])}): μ_Δ = {row['mu_delta']:.4f}, σ_Δ = {row['sigma_delta']:.4f}, ρ = {row['rho']:.3f}, "
            f"σ_cond = {row['sigma_cond']:.4f}; residual variance {absorbed}.")


def method_legend() -> str:
    return "\n".join(f"- **{m.label}**: {m.description}" for m in METHODS.values())
