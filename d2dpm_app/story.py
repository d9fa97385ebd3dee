"""What a comparison shows, in words: the numbers behind the interpretation under every result,
and the precomputed example the landing page of both apps shows before any click.

`story_numbers(result)` reduces a comparison to a few JSON-ready numbers (how far quantization
moved the samples' mean and spread, how much of the quantized model's error each correction
removed, where the quantization noise peaks); `interpretation(numbers)` turns them into the
short text both apps print under a result. The shipped example (`scripts/make_example.py`
writes it, `load_example()` reads it) stores the same numbers, so the landing's text is made by
the same function as the text under a new run. No UI library is imported here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from d2dpm.figures import identity_steps, method_label
from d2dpm.models import ASSETS_DIR

EXAMPLE_DIR = ASSETS_DIR / "example"
EXAMPLE_FORMAT = 1
EXAMPLE_FILES = ("grid.png", "metrics.csv", "story.json")


def story_numbers(result) -> dict:
    """The numbers the interpretation is made of, JSON-ready (no tensors, no NaN)."""
    config = result.config
    fp = result.samples["fp"].double()
    numbers: dict = {
        "format": EXAMPLE_FORMAT,
        "kind": result.model.kind,
        "model": result.model.name,
        "bits": f"W{config.w_bits}A{config.a_bits}",
        "backbone": getattr(config, "backbone", None),
        "steps": int(config.steps),
        "eta": float(config.eta),
        "methods": {},
    }
    metrics = result.metrics.set_index("method")
    q_mse = float(metrics.loc["q", "mse_to_fp"]) if "q" in metrics.index else None
    for method, samples in result.samples.items():
        if method == "fp":
            continue
        x = samples.double()
        if result.model.kind == "points":  # how far the cloud's centre moved (a distance), not a signed shift
            shift = float((x.mean(0) - fp.mean(0)).norm())
        else:
            shift = float(x.mean() - fp.mean())
        mse = float(metrics.loc[method, "mse_to_fp"])
        psnr = float(metrics.loc[method, "psnr_to_fp"])
        numbers["methods"][method] = {
            "label": method_label(method),
            "mean_shift": shift,
            "spread_ratio": float(x.std() / fp.std()) if float(fp.std()) > 0 else 1.0,
            "mse_to_fp": mse,
            "psnr_to_fp": psnr if math.isfinite(psnr) else None,
            "error_removed": (1.0 - mse / q_mse) if q_mse and method != "q" else None,
        }
    table = result.stats_table
    identity = identity_steps(table)
    active = table[~table["step"].isin(identity)] if len(identity) < len(table) else table
    peak = active.loc[active["mu_delta"].abs().idxmax()]
    numbers["peak_mean_step"] = int(peak["step"]) + 1
    numbers["peak_mean_delta"] = float(peak["mu_delta"])
    numbers["identity_steps"] = [s + 1 for s in identity]
    return numbers


def _percent(value: float) -> str:
    return f"{abs(value) * 100:.0f} %"


def _spread_words(ratio: float, kind: str) -> str:
    if kind == "points":
        return "more scattered" if ratio > 1.1 else "squeezed together" if ratio < 0.9 else "about as spread out"
    return "grainier or harsher" if ratio > 1.1 else "washed out (less contrast)" if ratio < 0.9 else "about as contrasted"


def interpretation(numbers: dict) -> str:
    """The short text under a result (and under the landing's example): what quantization did,
    how much of its error each correction removed, and where to look next. Markdown."""
    methods = numbers.get("methods", {})
    kind = numbers.get("kind", "image")
    lines = []
    q = methods.get("q")
    if q is not None:
        if kind == "image":
            shift = q["mean_shift"] / 2 * 100  # [-1, 1] pixels: a shift of 2 is the whole range
            moved = (f"{'brighter' if shift > 0 else 'darker'} on average by {abs(shift):.1f} % of the pixel range"
                     if abs(shift) >= 0.05 else "as bright on average")
        else:
            moved = f"shifted: the cloud's centre moved {q['mean_shift']:.3f} (data units)"
        closeness = f"PSNR to FP {q['psnr_to_fp']:.1f} dB" if q.get("psnr_to_fp") is not None else f"MSE to FP {q['mse_to_fp']:.3g}"
        backbone = f", {numbers['backbone']} backbone" if numbers.get("backbone") else ""
        lines.append(f"**What quantization did** ({numbers['bits']}{backbone}): from the same noise, the quantized model's "
                     f"samples came out {moved} and {_spread_words(q['spread_ratio'], kind)} "
                     f"(spread {q['spread_ratio']:.2f}× FP's); {closeness}.")
    corrections = [(m, v) for m, v in methods.items() if m != "q" and v.get("error_removed") is not None]
    if corrections:
        parts = []
        for method, values in corrections:
            removed = values["error_removed"]
            parts.append(f"{values['label']} {'removed' if removed >= 0 else 'added'} {_percent(removed)}")
        best_method, best = max(((m, v) for m, v in corrections if m != "oracle"), key=lambda mv: mv[1]["error_removed"],
                                default=(None, None))
        closest = ""
        if best is not None:
            where = f"{best['psnr_to_fp']:.1f} dB" if best.get("psnr_to_fp") is not None else f"MSE {best['mse_to_fp']:.3g}"
            closest = (f" Closest to FP: **{best['label']}** ({where})." if best["error_removed"] > 0
                       else " No correction brought the samples closer to FP here.")
        lines.append("**What the corrections removed** of that error (squared distance to FP): " + ", ".join(parts) + "." + closest)
    elif q is not None and "oracle" not in methods:
        lines.append("No correction row is switched on: turn on the mean or variance correction to see D²-DPM.")
    look = ("the |x − FP| heat-map rows (whiter = closer to FP)" if kind == "image"
            else "each method's points against FP's (grey)")
    peak = numbers.get("peak_mean_step")
    tail = f"; **Deviation curves**: the mean deviation μ_Δ peaks at step {peak} of {numbers['steps']}" if peak else ""
    identity = numbers.get("identity_steps") or []
    if identity:
        tail += f" (step {identity[-1]} is an identity step: its deviation cannot reach the sample)"
    lines.append(f"**Where to look**: {look}{tail}; **Trajectories**: the step where the rows part.")
    return "  \n".join(lines)


# -- the shipped example

@dataclass
class Example:
    """A precomputed comparison as the landing page shows it."""

    grid: Image.Image
    metrics: pd.DataFrame
    numbers: dict
    title: str
    config: dict

    def text(self) -> str:
        return interpretation(self.numbers)


def example_dir() -> Path:
    return Path(os.environ.get("D2DPM_EXAMPLE_DIR") or EXAMPLE_DIR)


def write_example(result, grid: Image.Image, title: str, folder: Path | None = None) -> list[Path]:
    """Write the example the landing shows: the grid PNG, the metrics table and story.json
    (the interpretation numbers, the title and the full configuration)."""
    folder = Path(folder) if folder is not None else example_dir()
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / "grid.png", optimize=True)
    result.metrics.to_csv(folder / "metrics.csv", index=False)
    story = {"title": title, "config": dataclasses.asdict(result.config), "model_identity": result.model.identity,
             "stats_source": result.stats_source, "numbers": story_numbers(result)}
    (folder / "story.json").write_text(json.dumps(story, indent=1, allow_nan=False) + "\n")
    return [folder / name for name in EXAMPLE_FILES]


def load_example(folder: Path | None = None) -> Example | None:
    """The shipped example, or None when it is missing or unreadable (the landing then just invites a run)."""
    folder = Path(folder) if folder is not None else example_dir()
    try:
        story = json.loads((folder / "story.json").read_text())
        if story["numbers"].get("format") != EXAMPLE_FORMAT:
            return None
        grid = Image.open(io.BytesIO((folder / "grid.png").read_bytes()))
        grid.load()
        metrics = pd.read_csv(folder / "metrics.csv")
    except (OSError, ValueError, KeyError):
        return None
    return Example(grid, metrics, story["numbers"], story["title"], story["config"])


def example_note(example: Example, default_config) -> str:
    """What the example was made with, and how it differs from the default run (if it does)."""
    differ = [f"{name} {example.config.get(name)!r}" for name in ("model", "w_bits", "a_bits", "steps", "eta", "seed", "num_images", "backbone")
              if default_config is not None and name in example.config
              and str(example.config.get(name)) != str(getattr(default_config, name, example.config.get(name)))]
    note = f"Precomputed example, shown before any run: {example.title}."
    if differ:
        note += " (Made with " + ", ".join(differ) + "; **Run comparison** runs the current settings.)"
    return note
