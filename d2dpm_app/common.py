"""What both UIs share and neither may compute twice: the settings widgets' values as one `Controls`,
turned into a `CompareConfig`, the work budget, the run lanes, the model summary, display tables, downloads and captions.

No UI library is imported here; `gradio_ui` and `streamlit_ui` are thin layers over it.

Safe in front of the public: only the embedded models and those the operator lists in
D2DPM_EXTRA_MODELS load; a run's whole work (sampling, and calibration when its statistics are not
ready) is counted against one budget before it starts; a run that calibrates takes the one
calibration lane (a second is refused at once, never queued in front of ordinary comparisons), the
others one of SAMPLING_SLOTS; a run stops between steps when its visitor stops it; its temporary
files are removed when it ends. Visitors see one-line messages, never exception text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import pandas as pd

from d2dpm.calibration import RECONSTRUCTION_INPUTS
from d2dpm.config import BACKBONES, DEFAULT_NUM_IMAGES, GRANULARITIES, MAX_IMAGES, MAX_POINTS, CompareConfig, default_num_images
from d2dpm.errors import Busy, Cancelled, ConfigError, check_int_range
from d2dpm.experiment import ComparisonResult, default_workbench
from d2dpm.figures import auto_scale, comparison_grid, method_label, result_grid, run_title, step_images, write_outputs
from d2dpm.methods import ALWAYS, DUAL, METHODS, ROW, method_for_switches
from d2dpm.models import EMBEDDED_MODELS, extra_models

log = logging.getLogger(__name__)

from . import story

DEFAULT_MODEL = os.environ.get("D2DPM_APP_MODEL", "emoji")
# The embedded models, then those the operator allows (D2DPM_EXTRA_MODELS); nothing else loads in the apps.
MODEL_CHOICES = list(dict.fromkeys([*EMBEDDED_MODELS, *extra_models()]))
# How the quantized network is made. AdaRound fits every layer for minutes of CPU: the apps use it only
# where its statistics are shipped or cached, and offer bias-correction (seconds) elsewhere.
BACKBONE_CHOICES = list(BACKBONES)
# The paper-like backbone, shipped for every default view (the core's default, bias-correction, is the
# one any configuration can calibrate in seconds on a CPU, so the CLI keeps it).
DEFAULT_BACKBONE = os.environ.get("D2DPM_APP_BACKBONE", "adaround")
DEFAULT = CompareConfig()  # the comparison the controls start from
PRESETS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A6": (4, 6)}
CUSTOM_PRESET = "custom"
MODES = {"S-D²": "stochastic", "D-D²": "deterministic"}
# The methods with a checkbox of their own ("extra rows"), in the registry's order, and those ticked at first.
ROW_METHODS = tuple(method for method in METHODS.values() if method.ui == ROW)
GRANULARITY_CHOICES = list(GRANULARITIES)
ALL_CLASSES = "all classes (one image each, cycling)"
BACKBONE_INFO = ("how the quantized network is made; before sampling it removes each layer's mean error at each step, "
                 "D²-DPM and PTQD then model the deviation left in ε̂ (AdaRound only where its statistics are ready)")
BACKBONE_HELP = ("PTQ backbone: how the quantized network is made, once, before sampling "
                 "(rtn: plain rounding; bias-correction: each layer's mean error removed, per step; adaround: learned "
                 "rounding, then the same correction); D²-DPM and PTQD then model the deviation left in ε̂ at each step.")

# The CPU budget: images × method rows × steps ("image-steps"). Each image-step is one image
# through one network at one step; the default comparison (9 emoji, 5 rows, 20 steps) is 900.
# 2,400 keeps a comparison of the embedded models to seconds on a 2-core Space. Operators with
# more hardware raise it with the environment variable D2DPM_MAX_IMAGE_STEPS.
MAX_IMAGE_STEPS = int(os.environ.get("D2DPM_MAX_IMAGE_STEPS", "2400"))
# The whole run, calibration included, in the same unit: a calibration runs calib_samples
# trajectories × steps through the FP network and again through the quantized one (× 2), and bias
# correction adds one dual forward of its RECONSTRUCTION_INPUTS fitting inputs (× 2). The default
# calibration (128 trajectories, 20 steps, bias correction: 7,168) plus a default comparison (900) fits.
MAX_WORK = int(os.environ.get("D2DPM_MAX_WORK", "9000"))
MAX_UI_STEPS = 100
MAX_CALIB_SAMPLES = 512
# A toy2d point goes through a 128-wide MLP: hundreds of them cost less than one 32×32 image through
# the UNet, so a point counts as 1/POINTS_PER_IMAGE of an image-step and clouds of thousands fit.
POINTS_PER_IMAGE = 256
# Runs at once: an ordinary comparison takes one of SAMPLING_SLOTS (waiting up to SLOT_WAIT seconds
# for one); a run that must calibrate takes the single calibration lane, or is refused at once.
SAMPLING_SLOTS = int(os.environ.get("D2DPM_SAMPLING_SLOTS", "2"))
CALIBRATION_LANES = 1
RUN_SLOTS = SAMPLING_SLOTS + CALIBRATION_LANES  # a UI's own concurrency limit for runs
SLOT_WAIT = float(os.environ.get("D2DPM_SLOT_WAIT", "120"))
_sampling_slots = threading.BoundedSemaphore(SAMPLING_SLOTS)
_calibration_lane = threading.BoundedSemaphore(CALIBRATION_LANES)
REQUEST_PREFIX = "d2dpm_request_"
STALE_REQUEST_SECONDS = 600


@dataclass(frozen=True)
class SampleCount:
    """The "how many samples" control for a kind of model: images, or toy points."""

    label: str
    maximum: int
    default: int


SAMPLE_COUNTS = {"image": SampleCount("Images", min(MAX_IMAGES, 32), DEFAULT_NUM_IMAGES), "points": SampleCount("Points", MAX_POINTS, 1000)}


def sample_count(summary: "ModelSummary") -> SampleCount:
    """The count control for this model: for a class-conditional image model, one image per
    class by default (emoji: 9, every group once), as a comparison with no count draws."""
    count = SAMPLE_COUNTS[summary.kind]
    if summary.kind == "image" and summary.conditional:
        return dataclasses.replace(count, default=min(count.maximum, default_num_images(len(summary.class_names))))
    return count


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
    allowed: str = ""  # when not ok: what is allowed instead, for the one-line refusal of a run

    def class_choices(self) -> list[str]:
        return [ALL_CLASSES] + [f"{i}: {name}" for i, name in enumerate(self.class_names)]


def describe_model(spec: str) -> ModelSummary:
    """Load a model the apps allow (cached by the core) and summarise it; a missing, refused or bad
    model gives ok=False and a message saying what to do, never an exception or a server path."""
    spec = (str(spec) if spec is not None else "").strip() or DEFAULT_MODEL
    shown = spec if len(spec) <= 120 else spec[:120] + "…"
    try:
        model = default_workbench().model(spec, public=True)
    except ConfigError as error:
        if spec in EMBEDDED_MODELS and str(error.allowed).endswith("missing from assets/models"):
            message = (f"The embedded model '{spec}' is not installed here (assets/models/{spec} is missing). "
                       "Train it with `d2dpm train` (see the README), or choose another model.")
        else:  # the allow-list's refusal, or why an allowed model cannot load (named by the spec, not a path)
            message = f"Model not available: {shown!r}. Allowed: {error.allowed}."
        return ModelSummary(spec, False, message=message, allowed=str(error.allowed))
    except Exception:  # keep serving; the operator's log has the details
        log.exception("loading model %r failed", spec)
        return ModelSummary(spec, False, message=f"Model not available: {shown!r}. It could not be loaded on this server.",
                            allowed="a model that loads on this server")
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


def methods_from_switches(mean: bool, variance: bool, modes, rows=()) -> tuple[str, ...]:
    """The method rows the switches select, in the registry's order: those always shown (FP, the quantized
    model), the D² variant of each chosen mode (one when S and D coincide, with the variance off) and
    the extra rows ticked (`rows`: names of ROW methods, e.g. PTQD, the oracle)."""
    dual = set()
    for mode_label in modes or ():
        if mode_label not in MODES:
            raise ConfigError("mode", mode_label, " or ".join(MODES))
        dual.add(method_for_switches(bool(mean), bool(variance), MODES[mode_label]))
    for name in rows or ():
        if name not in {method.name for method in ROW_METHODS}:
            raise ConfigError("rows", name, ", ".join(method.name for method in ROW_METHODS))
    return tuple(name for name, method in METHODS.items()
                 if method.ui == ALWAYS or (method.ui == ROW and name in (rows or ())) or (method.ui == DUAL and name in dual))


def preset_for_bits(w_bits, a_bits) -> str:
    """The preset these bit-widths are, or CUSTOM_PRESET."""
    for name, bits in PRESETS.items():
        try:
            if bits == (int(w_bits), int(a_bits)):
                return name
        except (TypeError, ValueError):
            break
    return CUSTOM_PRESET


DEFAULT_PRESET = preset_for_bits(DEFAULT.w_bits, DEFAULT.a_bits)


@dataclass(frozen=True)
class Controls:
    """The values of the settings widgets, as both UIs read them: built once per run, then `plan_run`.

    The defaults are the widgets' starting values, those of `CompareConfig()` (its methods as the
    switches and extra rows that select them). Gradio hands the values over one by one in
    `widget_names()` order: these fields, with one checkbox per extra row in place of `rows`."""

    model: str | None = None  # None: the apps' DEFAULT_MODEL
    w_bits: int = DEFAULT.w_bits
    a_bits: int = DEFAULT.a_bits
    steps: int = DEFAULT.steps
    eta: float = DEFAULT.eta
    guidance: float | None = CompareConfig.default_guidance(conditional=True)  # ignored for unconditional models
    class_choice: str | int | None = ALL_CLASSES
    seed: int = DEFAULT.seed
    num_images: int | None = None  # None: the model's sample_count default
    mean: bool = True  # the D² switches
    variance: bool = True
    modes: tuple[str, ...] = tuple(label for label, mode in MODES.items() if method_for_switches(True, True, mode) in DEFAULT.methods)
    rows: tuple[str, ...] = tuple(method.name for method in ROW_METHODS if method.name in DEFAULT.methods)
    calib_samples: int = DEFAULT.calib_samples
    granularity: str = DEFAULT.granularity
    backbone: str | None = None  # None: the apps' DEFAULT_BACKBONE

    @staticmethod
    def widget_names() -> list[str]:
        return [name for f in fields(Controls) for name in ([m.name for m in ROW_METHODS] if f.name == "rows" else [f.name])]

    @classmethod
    def from_widgets(cls, *values) -> "Controls":
        """From the widgets' values in `widget_names()` order."""
        given = dict(zip(cls.widget_names(), values))
        rows = tuple(method.name for method in ROW_METHODS if given.pop(method.name))
        return cls(**given, rows=rows)

    @property
    def methods(self) -> tuple[str, ...]:
        return methods_from_switches(self.mean, self.variance, self.modes, self.rows)


def calibration_work(calib_samples: int, steps: int, backbone: str, kind: str = "image") -> float:
    """What calibrating costs, in image-steps: trajectories × steps through the FP network and again through
    the quantized one, plus bias correction's dual forward of its fitting inputs (points count 1/POINTS_PER_IMAGE).
    AdaRound is not counted: the apps never run it (see `plan_run`)."""
    per_image = POINTS_PER_IMAGE if kind == "points" else 1
    work = int(calib_samples) * int(steps) * 2
    if backbone == "bias-correction":
        work += RECONSTRUCTION_INPUTS * 2
    return work / per_image


def check_budget(num_images: int, methods: tuple[str, ...], steps: int, kind: str = "image", calibration: float = 0.0) -> float:
    """Samples × method rows × steps must stay within MAX_IMAGE_STEPS, and with the calibration's work
    (0 when its statistics are ready) within MAX_WORK; toy points count POINTS_PER_IMAGE to an image.
    Returns the run's whole work."""
    per_image = POINTS_PER_IMAGE if kind == "points" else 1
    work = int(num_images) / per_image * len(methods) * int(steps)
    what = f"{num_images} points (= {num_images / per_image:g} images)" if kind == "points" else f"{num_images} images"
    if work > MAX_IMAGE_STEPS:
        raise ConfigError(
            "num_images",
            f"{what} × {len(methods)} methods × {steps} steps = {work:g} image-steps",
            f"at most {MAX_IMAGE_STEPS} image-steps on this CPU (fewer samples, steps or methods)",
        )
    if work + calibration > MAX_WORK:
        raise ConfigError(
            "calib_samples",
            f"a calibration of {calibration:g} image-steps (trajectories × steps × 2 networks) before sampling {work:g}",
            f"at most {MAX_WORK} image-steps for the whole run on this CPU (fewer calibration trajectories or steps, "
            "or settings whose statistics are ready)",
        )
    return work + calibration


@dataclass(frozen=True)
class Plan:
    """A checked run: its configuration, whether it must calibrate first, and its whole work in image-steps."""

    config: CompareConfig
    calibrates: bool
    work: float


def plan_run(controls: Controls) -> Plan:
    """The widgets' values → a checked run, before any work: every value, the model against the allow-list,
    and the whole work (calibration included when no statistics are ready) against the budget. Raises ConfigError."""
    summary = describe_model(controls.model)
    if not summary.ok:
        raise ConfigError("model", summary.spec, summary.allowed)
    steps = check_int_range("steps", controls.steps, 1, MAX_UI_STEPS)
    count = sample_count(summary)
    num_images = check_int_range("num_images", count.default if controls.num_images is None else controls.num_images, 1, count.maximum)
    calib_samples = check_int_range("calib_samples", controls.calib_samples, 2, MAX_CALIB_SAMPLES)
    backbone = DEFAULT_BACKBONE if controls.backbone in (None, "") else controls.backbone
    if backbone not in BACKBONE_CHOICES:
        raise ConfigError("backbone", backbone, ", ".join(BACKBONE_CHOICES))
    methods = controls.methods
    check_budget(num_images, methods, steps, summary.kind)
    guidance = controls.guidance
    if guidance is None or (isinstance(guidance, float) and math.isnan(guidance)) or not summary.conditional:
        guidance = None  # unconditional models sample without guidance (the control is hidden for them)
    config = CompareConfig(
        model=summary.spec,
        w_bits=_int_or_raw(controls.w_bits),
        a_bits=_int_or_raw(controls.a_bits),
        steps=steps,
        eta=controls.eta,
        guidance=guidance,
        class_label=parse_class(controls.class_choice, summary.conditional),
        methods=methods,
        seed=_int_or_raw(controls.seed),
        num_images=num_images,
        calib_samples=calib_samples,
        granularity=controls.granularity,
        backbone=backbone,
    )
    return plan_config(config)


def plan_config(config: CompareConfig) -> Plan:
    """Check a configuration for a run in the apps: the model against the allow-list, every value, whether
    its statistics are ready (AdaRound is refused if not), and its whole work against the budget."""
    workbench = default_workbench()
    loaded = workbench.model(config.model, public=True)
    kind = loaded.kind
    checked = config.validated(loaded)
    calibrates = workbench.find_statistics(checked.stats_config(loaded)) is None
    if calibrates and config.backbone == "adaround":
        raise ConfigError("backbone", "adaround", "bias-correction or rtn for these settings: AdaRound fits every layer for "
                          "minutes of CPU, so this server uses it only where its statistics are shipped or cached "
                          "(bias-correction calibrates in seconds)")
    calib_samples = check_int_range("calib_samples", config.calib_samples, 2, MAX_CALIB_SAMPLES)
    steps = check_int_range("steps", config.steps, 1, MAX_UI_STEPS)
    calibration = calibration_work(calib_samples, steps, config.backbone, kind) if calibrates else 0.0
    work = check_budget(checked.num_images, checked.methods, steps, kind, calibration)
    return Plan(config, calibrates, work)


def build_config(controls: Controls) -> CompareConfig:
    """The widgets' values → a checked CompareConfig (see `plan_run`). Raises ConfigError."""
    return plan_run(controls).config


# -- running: lanes, progress, stopping, temporary files

@dataclass
class Calibrating:
    """Streamed while a run calibrates."""

    fraction: float
    message: str


@dataclass
class Waiting:
    """Streamed by `stream_run(plan, heartbeat=…)` after `heartbeat` seconds without news (waiting for a
    free slot, or a silent part of the work): a point where the UI can notice that its visitor stopped."""

    message: str


def stream_run(plan: Plan, heartbeat: float | None = None) -> Iterator:
    """Run a planned comparison in a worker thread; yield `Calibrating` while it calibrates, then what
    `Workbench.iter_compare` yields. Raises Busy when no slot of its kind is free, Cancelled if stopped.

    Closing this generator (Gradio's cancel, Streamlit's stop, a visitor who leaves) stops the run at
    its next step; its slot is given back when the worker ends. With `heartbeat` (seconds), a `Waiting`
    event comes whenever nothing else did for that long, so a UI that can only be interrupted when it
    updates the page (Streamlit) stays stoppable while the run waits for a slot or works silently."""
    lane = _calibration_lane if plan.calibrates else _sampling_slots
    if plan.calibrates:
        if not lane.acquire(blocking=False):
            raise Busy("Another visitor's calibration is running, and this server calibrates one at a time. Try again in a "
                       "minute, or choose settings whose statistics are ready (the presets at 20 steps).")
    else:
        deadline = time.monotonic() + SLOT_WAIT
        while not lane.acquire(timeout=max(0.0, min(heartbeat or SLOT_WAIT, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise Busy(f"The server is busy with other comparisons (no free slot in {SLOT_WAIT:g} s). Please try again.")
            yield Waiting("waiting for a free slot (other visitors' comparisons are running)…")
    stop = threading.Event()
    events: queue.Queue = queue.Queue()

    def progress(fraction: float, message: str) -> None:
        if stop.is_set():
            raise Cancelled("stopped")
        events.put(Calibrating(fraction, message))

    def work() -> None:
        try:
            for event in default_workbench().iter_compare(plan.config, progress=progress, allow_calibration=plan.calibrates,
                                                          should_stop=stop.is_set, public=True):
                events.put(event)
        except BaseException as error:  # handed to the consumer, which shows one line
            events.put(error)
        finally:
            lane.release()
            events.put(StopIteration())

    threading.Thread(target=work, name="d2dpm-run", daemon=True).start()
    try:
        while True:
            try:
                event = events.get(timeout=heartbeat)
            except queue.Empty:
                yield Waiting("working…")
                continue
            if isinstance(event, StopIteration):
                return
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        stop.set()


def visitor_message(error: BaseException) -> tuple[str, str]:
    """(title, one line) to show a visitor for a failed run; never exception text or server paths
    (an unexpected error is logged for the operator, with its traceback and the reference shown)."""
    if isinstance(error, ConfigError):
        return "Please check the settings", str(error)
    if isinstance(error, Busy):
        return "Server busy", str(error)
    if isinstance(error, Cancelled):
        return "Stopped", "The run was stopped."
    reference = uuid.uuid4().hex[:8]
    log.error("run failed (reference %s)", reference, exc_info=error)
    return "Something went wrong", f"The comparison failed on the server (reference {reference}). Please try other settings."


def new_request_folder() -> Path:
    """A private temporary folder for one request's files (remove it with `remove_request_folder` when the
    request ends); this process's request folders older than STALE_REQUEST_SECONDS are swept first."""
    root = Path(tempfile.gettempdir())
    prefix = f"{REQUEST_PREFIX}{os.getpid()}_"
    for stale in root.glob(prefix + "*"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_REQUEST_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def remove_request_folder(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _int_or_raw(value):
    """Sliders and number boxes send 4.0 for 4; keep anything else as given for the core to reject."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- what a run shows

GUIDE = """**What to look at**, in this order:
1. **Compare**: the quantized row against FP (a colour shift is the *mean* deviation, grain the *variance*), then each correction's |x − FP| row: whiter is closer to full precision.
2. **Deviation curves**: how big the quantization noise Δ is at each step (μ_Δ, σ_Δ) and how much of it the quantized output predicts (ρ).
3. **Trajectories**: the step where each method's path leaves FP's, and each method's predicted x₀ at any step.
4. **Method**: the equations, and five "predict, then toggle" exercises."""

DEVIATION_INTRO = ("How big the quantization noise Δ is at each step, how correlated with the quantized output ε̂, and how much of "
                   "it D-D² can absorb (grey: steps where it cannot, all of them at η = 0). The last step (t = 0) is an identity "
                   "for the shipped schedules: its deviation cannot reach the sample. With the rtn backbone μ_Δ is mostly the "
                   "layers' own mean quantization error, which a backbone removes before sampling; with bias-correction or "
                   "adaround it is the deviation left, the one D²-DPM and PTQD model (Method, section 2).")
PROMPT = ("**No comparison yet.** This view needs a run: press **Run comparison** (here, or on the Compare page) "
          "and it fills in. The Compare page shows a precomputed example meanwhile.")
TRAJECTORIES_INTRO = "Distance of each method's sampling trajectory to the full-precision one, step by step."

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
POINT_METRIC_COLUMNS = [c for c in METRIC_COLUMNS if c != "PSNR to FP (dB)"]  # PSNR means nothing for 2-D points


def metrics_display(metrics: pd.DataFrame | None, kind: str = "image") -> pd.DataFrame:
    """The metrics table as students read it: rounded, named columns, FP's PSNR as '—' (empty before a run).
    Point models have no PSNR column (their distance to FP is the MSE, in data units)."""
    columns = POINT_METRIC_COLUMNS if kind == "points" else METRIC_COLUMNS
    rows = []
    if metrics is None:
        return pd.DataFrame(columns=columns)
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
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)[columns]


def efficiency_line(result: ComparisonResult) -> str:
    e = result.efficiency.as_dict()
    return (f"Model size {e['fp_size_mb']:.4g} → {e['q_size_mb']:.4g} MB ({e['compression']:.2f}× smaller); "
            f"BOPs {e['fp_gbops']:.4g} → {e['q_gbops']:.4g} G per network evaluation ({e['bop_ratio']:.1f}× fewer).")


def summary_markdown(result: ComparisonResult, seconds: float | None = None, cached: bool = False) -> str:
    """The lines under a result: what ran (and how long it took, or that it came from the cache of
    finished runs), the interpretation of its numbers, and the efficiency line."""
    if cached:
        timing = f", returned from the cache of finished runs in {seconds:.2f} s." if seconds is not None else ", from the cache of finished runs."
    else:
        timing = f", {seconds:.1f} s." if seconds is not None else "."
    lines = [f"**{run_title(result)}**, backbone {result.config.backbone}, "
             f"{SOURCE_TEXT.get(result.stats_source, 'statistics from ' + str(result.stats_source))}" + timing,
             story.interpretation(story.story_numbers(result)),
             efficiency_line(result)]
    return "  \n".join(lines)


DOWNLOAD_NAMES = ("grid.png", "metrics.csv", "per_image.csv", "trajectory.csv", "stats.csv", "run.json")
DOWNLOAD_TYPES = {".png": "image/png", ".csv": "text/csv", ".json": "application/json"}


def write_downloads(result: ComparisonResult, folder: Path) -> list[Path]:
    """The grid PNG (with its difference rows) and the per-step tables as CSV: the files and names of `d2dpm compare --out`."""
    return write_outputs(result, folder, differences=True)


def download_payloads(result: ComparisonResult, grid=None) -> list[tuple[str, bytes, str]]:
    """(file name, bytes, MIME type) of every download, in memory: the same files, names and contents
    as `write_downloads` (Streamlit serves bytes, Gradio serves files)."""
    import io

    grid = grid if grid is not None else final_grid(result)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    contents = {
        "grid.png": buffer.getvalue(),
        "metrics.csv": result.metrics.to_csv(index=False).encode(),
        "per_image.csv": result.per_image.to_csv(index=False).encode(),
        "trajectory.csv": result.trajectory.to_csv(index=False).encode(),
        "stats.csv": result.stats_table.to_csv(index=False).encode(),
        "run.json": json.dumps(result.run_info(), indent=2).encode(),
    }
    return [(name, contents[name], DOWNLOAD_TYPES[Path(name).suffix]) for name in DOWNLOAD_NAMES]


def result_bytes(result: ComparisonResult) -> int:
    """The memory a finished comparison holds in tensors (its step records dominate)."""
    import torch

    total = sum(t.numel() * t.element_size() for t in result.samples.values())
    for step in result.records:
        for record in step.values():
            for value in vars(record).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


# What the shared store of finished comparisons may hold, in results and in memory (a comparison at the
# whole budget holds about 150 MB of step records). The latest result always stays.
MAX_STORED_RESULTS = int(os.environ.get("D2DPM_MAX_STORED_RESULTS", "16"))
MAX_STORED_RESULTS_MB = float(os.environ.get("D2DPM_MAX_STORED_RESULTS_MB", "512"))


class ResultStore:
    """Finished comparisons keyed by their full configuration, shared by every visitor of one server
    (results are read-only once made), so an identical run returns at once. Thread-safe, least recently
    used dropped first beyond `size` results or `max_mb` of tensors (the most recent always stays).

    The apps keep a visitor's latest result here and only its key in the visitor's session, so the
    memory results take is bounded however many sessions there are."""

    def __init__(self, size: int = MAX_STORED_RESULTS, max_mb: float | None = None):
        self.size, self.lock, self.items = size, threading.Lock(), OrderedDict()
        self.max_bytes = (MAX_STORED_RESULTS_MB if max_mb is None else max_mb) * 2**20
        self.sizes: dict = {}

    def get(self, config: CompareConfig) -> ComparisonResult | None:
        with self.lock:
            if config in self.items:
                self.items.move_to_end(config)
                return self.items[config]
            return None

    def put(self, config: CompareConfig, result: ComparisonResult) -> None:
        size = result_bytes(result)
        with self.lock:
            self.items[config] = result
            self.items.move_to_end(config)
            self.sizes[config] = size
            while len(self.items) > 1 and (len(self.items) > self.size or sum(self.sizes.values()) > self.max_bytes):
                evicted, _ = self.items.popitem(last=False)
                self.sizes.pop(evicted, None)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)

    def nbytes(self) -> int:
        with self.lock:
            return sum(self.sizes.values())


def rows_note(mean: bool, variance: bool, modes) -> str:
    """Why a D² row the visitor may expect is missing ('' when every chosen row is there)."""
    if not mean and not variance:
        return "Mean and variance correction are both off, so there is no D² row (nothing left to correct)."
    if not modes:
        return "No mode (S-D² or D-D²) is chosen, so there is no D² row."
    if not variance and len(modes) > 1:
        return "With the variance correction off, S-D² and D-D² are the same: one 'D² mean only' row."
    return ""


def samples_caption(kind: str) -> str:
    if kind == "points":
        return ("One panel per method, all from the same noise: each method's points in its colour, FP's points in grey "
                "behind them (closer to grey = closer to full precision).")
    return ("Rows: FP | quantized | corrections, all from the same noise. Under each row, the heat-map of |x − FP| "
            "(white = identical to full precision, on one fixed scale for every run).")


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

