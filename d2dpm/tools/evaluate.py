"""`d2dpm evaluate`: a paper-style results table over bit-widths × η × methods, spread over seeds.

For every cell (model, W/A bits, η, guidance, seed) the methods are sampled side by side from the
same noise (`Workbench.compare`, in chunks of at most 64 images or 4096 toy points), then each method's N samples get:

- size MB, BOPs, compression and BOP ratios (from the comparison);
- MSE and PSNR to the FP samples drawn from the same noise;
- distances to the training data (see `d2dpm.tools.distances`): SWD ×10³ (weights-free) for the image
  models; FD-FashionCNN for Fashion-MNIST; FD-EffNetLite0 and Inception FID when available;
  the energy distance and exact NLL for toy2d.

Then every figure is averaged over the seeds and its standard deviation across seeds is given, so a
difference between rows can be read against its spread. `--diagnostics` also checks the noise
model itself on fresh FP trajectories (is Δ Gaussian per step, how large is ρ, how much of the
conditional variance D-D² can absorb, does mean correction leave a variance deficit or excess).

Writes results.csv (aggregated), per_seed.csv, results.md, and diagnostics.csv / run.json.
`--merge` joins the folders of a grid run in pieces (one process per backbone, side by side on a
GPU machine) into those same files, as one run would have written them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import BACKBONES, DEFAULT_BACKBONE, DEFAULT_CALIB_SAMPLES, MAX_IMAGES, MAX_POINTS, CompareConfig, check_eta, parse_methods
from ..errors import ConfigError
from .arguments import DEFAULT, DISTANCE_NAMES

ROW_KEYS = ("model", "backbone", "bits", "eta", "guidance", "steps", "method", "seed")  # one row of per_seed.csv
METRIC_COLUMNS = ("mse_to_fp", "psnr_to_fp", "class_accuracy", "swd", "fd_fashioncnn", "fd_effnetlite0", "fid_inception", "energy", "nll")
LOWER_IS_BETTER = {"mse_to_fp": True, "psnr_to_fp": False, "class_accuracy": False, "swd": True, "fd_fashioncnn": True,
                   "fd_effnetlite0": True, "fid_inception": True, "energy": True, "nll": True}
COLUMN_TITLES = {
    "mse_to_fp": "MSE→FP", "psnr_to_fp": "PSNR→FP dB", "class_accuracy": "class acc.", "swd": "SWD×10³", "fd_fashioncnn": "FD-FashionCNN",
    "fd_effnetlite0": "FD-EffNetLite0", "fid_inception": "FID (Inception)", "energy": "energy dist.", "nll": "NLL nats",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_bits(text: str) -> list[tuple[int, int]]:
    """'W8A8,W4A8' or '8/8,4/8' → [(8, 8), (4, 8)]."""
    pairs = []
    for item in [part.strip() for part in text.split(",") if part.strip()]:
        upper = item.upper().replace("/", "A")
        if not upper.startswith("W"):
            upper = "W" + upper
        try:
            w, a = upper[1:].split("A")
            pairs.append((int(w), int(a)))
        except ValueError:
            raise ConfigError("bits", item, "a comma-separated list like W8A8,W4A8,W4A6") from None
    if not pairs:
        raise ConfigError("bits", text, "a comma-separated list like W8A8,W4A8,W4A6")
    return pairs


def _floats(argument: str, text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(argument, text, "a comma-separated list of numbers") from None


def _ints(argument: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(argument, text, "a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(argument, text, "a comma-separated list of integers ≥ 0")
    return values


# ---------------------------------------------------------------------------------------------
# Distances, set up once per model


def load_reference_file(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An .npz with `images` ([N, H, W, C] or [N, H, W] uint8, or [N, C, H, W] float in [-1, 1])
    and optionally `labels` (class indices, for class-matched SWD and class-balanced statistics)."""
    try:
        with np.load(path) as data:
            images, labels = data["images"], (data["labels"] if "labels" in data.files else None)
    except (OSError, KeyError, ValueError) as error:
        raise ConfigError("reference", path, f"an .npz file with an 'images' array ({type(error).__name__}: {error})") from None
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == np.uint8:
        tensor = tensor.float().div(127.5).sub(1.0)
        tensor = tensor[:, None] if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
    return tensor.float().contiguous(), (torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)


def _reference_data(model_spec: str, reference_path: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Reference images and, where class-conditional sampling needs them, their labels."""
    from . import distances as D

    if reference_path:
        return load_reference_file(reference_path)
    if model_spec == "emoji":  # the whole training set, imbalanced across the 9 groups
        from .datasets import load_emoji32

        data = load_emoji32()
        return data.images, data.labels
    try:
        # fashion: a random subset of the test set, balanced up to sampling noise
        return D.reference_images(model_spec), None
    except D.OptionalDependencyMissing as missing:
        _log(f"evaluate: {missing}")
        return None, None


def class_balancing_weights(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Weights that give every class the same total weight (None: equal weights)."""
    if labels is None:
        return None
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


def weighted_feature_stats(features: torch.Tensor, weights: torch.Tensor | None):
    """`FeatureStats` of features [N, D] with optional per-sample (reliability) weights."""
    from .distances import FeatureStats

    if weights is None:
        return FeatureStats.from_features(features)
    x = features.double().cpu()
    w = weights.double().cpu() / weights.double().sum()
    mu = w @ x
    centred = x - mu
    sigma = (centred * w[:, None]).T @ centred / (1 - w.pow(2).sum())
    return FeatureStats(mu.numpy(), sigma.numpy(), int(x.shape[0]))


class DistanceSuite:
    """The distances that apply to one model, with their reference data loaded once."""

    def __init__(self, model_spec: str, kind: str, shape: tuple[int, ...], wanted: set[str], device: str, cache_dir: Path | None = None,
                 reference_path: str | None = None, conditional: bool = False):
        from . import distances as D

        self.kind, self.device, self.notes = kind, device, []
        self.reference = None
        self.fashion = self.effnet = self.effnet_reference = self.fid = self.classes = None
        if kind != "image":
            self.toy = "toy" in wanted and model_spec == "toy2d"
            if "toy" in wanted and not self.toy:
                self.notes.append(f"toy distances apply only to a model of the toy2d mixture, not to {model_spec!r}")
            return
        self.toy = False
        self.reference_labels = None
        image_distances = wanted & {"swd", "fd_effnetlite0", "fid_inception"}
        if image_distances:
            self.reference, self.reference_labels = _reference_data(model_spec, reference_path)
            if not conditional:
                self.reference_labels = None
            if self.reference is not None and tuple(self.reference.shape[1:]) != tuple(shape):
                self.notes.append(f"reference images {tuple(self.reference.shape[1:])} do not match samples {tuple(shape)}: distances to data skipped")
                self.reference = None
            if self.reference is None:
                self.notes.append(f"no reference data known for model {model_spec!r}: SWD / FD-EffNetLite0 / FID skipped")
        if "class_accuracy" in wanted and conditional:
            try:
                self.classes = D.ClassAccuracy(model_spec, device)
            except D.OptionalDependencyMissing as missing:
                self.notes.append(str(missing))
        if "fd_fashioncnn" in wanted and model_spec == "fashion":
            try:
                self.fashion = D.FashionClassifierFD(device)
            except D.OptionalDependencyMissing as missing:
                self.notes.append(str(missing))
        if "fd_effnetlite0" in wanted and self.reference is not None:
            try:
                self.effnet = D.EffNetLite0Features(device)
                self.effnet_reference = self._effnet_reference(model_spec, cache_dir)
            except D.OptionalDependencyMissing as missing:
                self.effnet = None
                self.notes.append(str(missing))
        if "fid_inception" in wanted and self.reference is not None:
            try:
                self.fid = D.InceptionFID(device)
            except D.OptionalDependencyMissing as missing:
                self.notes.append(str(missing))
        self.swd = "swd" in wanted and self.reference is not None
        for note in self.notes:
            _log(f"evaluate: {note}")

    def _effnet_reference(self, model_spec: str, cache_dir: Path | None):
        from . import distances as D

        path = None
        if cache_dir is not None:
            balanced = "balanced" if self.reference_labels is not None else "plain"
            key = hashlib.sha256(self.reference[:64].numpy().tobytes()).hexdigest()[:10]  # which images, not just how many
            path = Path(cache_dir) / "eval" / f"effnetlite0_{Path(model_spec).name}_{self.reference.shape[0]}_{key}_{balanced}.safetensors"
            if path.is_file():
                return D.FeatureStats.load(path)
        _log(f"evaluate: EfficientNet-Lite0 features of {self.reference.shape[0]} reference images (once, then cached)")
        stats = weighted_feature_stats(self.effnet(self.reference), class_balancing_weights(self.reference_labels))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(path)
        return stats

    def matched_reference(self, labels: torch.Tensor | None, seed: int) -> torch.Tensor:
        """For SWD: one reference image of the same class per generated sample (the generated
        labels cycle evenly through the classes, the training data need not), or all of them."""
        if labels is None or self.reference_labels is None:
            return self.reference
        generator = torch.Generator().manual_seed(seed)
        picks = torch.empty(len(labels), dtype=torch.long)
        for label in labels.unique().tolist():
            where = (labels == label).nonzero().flatten()
            pool = (self.reference_labels == label).nonzero().flatten()
            picks[where] = pool[torch.randint(len(pool), (len(where),), generator=generator)]
        return self.reference[picks]

    def __call__(self, samples: torch.Tensor, seed: int, labels: torch.Tensor | None = None) -> dict[str, float]:
        from . import distances as D

        out: dict[str, float] = {}
        if self.kind != "image":
            if self.toy:
                out.update(D.toy2d_distances(samples, seed=seed))
            return out
        if self.swd:
            out["swd"] = D.sliced_wasserstein(samples, self.matched_reference(labels, seed), seed=seed, device=self.device).mean
        if self.classes is not None and labels is not None:
            out["class_accuracy"] = self.classes(samples, labels)
        if self.fashion is not None:
            out["fd_fashioncnn"] = self.fashion(samples)
        if self.effnet is not None:
            out["fd_effnetlite0"] = D.frechet_from_stats(D.FeatureStats.from_features(self.effnet(samples)), self.effnet_reference)
        if self.fid is not None:
            out["fid_inception"] = self.fid(samples, self.reference)
        return out


# ---------------------------------------------------------------------------------------------
# The grid


@dataclasses.dataclass
class EvaluateConfig:
    models: list[str]
    bits: list[tuple[int, int]]
    etas: list[float]
    guidances: list[float | None]
    methods: tuple[str, ...]
    seeds: list[int]
    num_samples: int = 64
    steps: int = DEFAULT.steps
    calib_samples: int | None = None
    distances: tuple[str, ...] = DISTANCE_NAMES
    backbones: tuple[str, ...] = (DEFAULT_BACKBONE,)
    diagnostics: bool = False
    diagnostic_samples: int = 32


def _chunk_seeds(seed: int, num_samples: int, chunk_size: int) -> list[tuple[int, int]]:
    """(compare seed, images) per chunk: chunk c of seed s uses seed s·1000 + c."""
    chunks, left, c = [], num_samples, 0
    while left > 0:
        size = min(chunk_size, left)
        chunks.append((seed * 1000 + c, size))
        left -= size
        c += 1
    return chunks


def evaluate_cell(workbench, model_spec: str, w_bits: int, a_bits: int, eta: float, guidance, cfg: EvaluateConfig,
                  seed: int, suite: DistanceSuite, progress=None, include_fp: bool = True,
                  backbone: str = DEFAULT_BACKBONE) -> tuple[list[dict], object]:
    """One configuration and seed: all methods on N shared-noise samples; one row per method."""
    from ..metrics import per_image_errors
    from ..models import load_model

    samples: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    result = None
    chunk_size = MAX_POINTS if load_model(model_spec).kind == "points" else MAX_IMAGES  # compare's own limit
    for chunk_seed, size in _chunk_seeds(seed, cfg.num_samples, chunk_size):
        config = CompareConfig(model=model_spec, w_bits=w_bits, a_bits=a_bits, steps=cfg.steps, eta=eta, guidance=guidance,
                               methods=cfg.methods, seed=chunk_seed, num_images=size, backbone=backbone,
                               calib_samples=cfg.calib_samples or DEFAULT_CALIB_SAMPLES)
        result = workbench.compare(config, progress=progress)
        for name, tensor in result.samples.items():
            samples.setdefault(name, []).append(tensor.detach().float().cpu())
        if result.labels is not None:  # they cycle through the classes in every chunk
            labels.append(result.labels.cpu())
    merged = {name: torch.cat(parts) for name, parts in samples.items()}
    all_labels = torch.cat(labels) if labels else None
    metrics = result.metrics.set_index("method")
    rows = []
    for name, tensor in merged.items():
        is_fp = name == "fp"
        if is_fp and not include_fp:
            continue  # FP does not depend on the bit-widths: one row per (model, η, guidance, seed)
        mse, psnr = per_image_errors(tensor, merged["fp"], result.model.kind)
        row = {
            "model": model_spec,
            "bits": "W32A32" if is_fp else f"W{w_bits}A{a_bits}",
            "backbone": "—" if is_fp else backbone,
            "w_bits": 32 if is_fp else w_bits,
            "a_bits": 32 if is_fp else a_bits,
            "eta": float(eta),
            "guidance": float(result.config.guidance),
            "steps": cfg.steps,
            "method": name,
            "label": metrics.loc[name, "label"],
            "seed": seed,
            "n": int(tensor.shape[0]),
            "size_mb": float(metrics.loc[name, "size_mb"]),
            "gbops": float(metrics.loc[name, "gbops"]),
            "compression": float(metrics.loc[name, "compression"]),
            "bop_ratio": float(metrics.loc[name, "bop_ratio"]),
            "mse_to_fp": float(mse.mean()),
            "psnr_to_fp": float(psnr.mean()) if name != "fp" and result.model.kind == "image" else math.nan,
        }
        row.update(suite(tensor, seed, all_labels))
        rows.append(row)
    return rows, result


def aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of every metric, with `<metric>_std` (sample std across seeds)."""
    keys = ["model", "backbone", "bits", "w_bits", "a_bits", "eta", "guidance", "steps", "method", "label"]
    present = [c for c in METRIC_COLUMNS if c in per_seed.columns and per_seed[c].notna().any()]
    constant = ["size_mb", "gbops", "compression", "bop_ratio"]
    grouped = per_seed.groupby(keys, sort=False, dropna=False)
    table = grouped[constant].first()
    table["seeds"] = grouped["seed"].nunique()
    table["n_per_seed"] = grouped["n"].first()
    for column in present:
        table[column] = grouped[column].mean()
        table[column + "_std"] = grouped[column].std(ddof=1)
    return table.reset_index()


# ---------------------------------------------------------------------------------------------
# Noise-model diagnostics on fresh FP trajectories


def _moments(values: torch.Tensor) -> tuple[float, float]:
    """Skewness and excess kurtosis of a flat sample."""
    v = values.double().flatten()
    v = v - v.mean()
    var = v.pow(2).mean()
    return float(v.pow(3).mean() / var.pow(1.5)), float(v.pow(4).mean() / var.pow(2) - 3.0)


def noise_diagnostics(workbench, model_spec: str, w_bits: int, a_bits: int, eta: float, guidance, steps: int,
                      calib_samples: int | None, num_samples: int = 32, seed: int = 987_654,
                      backbone: str = DEFAULT_BACKBONE) -> pd.DataFrame:
    """Per step, on FP-driven trajectories not used for calibration: the fitted ρ, σ_Δ, σ_cond; the
    share of σ_t² that D-D² takes for the residual (k_t²σ_cond²/σ_t²); skewness and excess kurtosis
    of Δ (standardised per channel and pooled, as the noise model pools it) and of the residual
    ε − E' left after the conditional-mean correction E' = ε̂ − μ_cond(ε̂); and the variances of ε,
    ε̂ and E'. Var(E') < Var(ε) means mean correction leaves a variance *deficit*, which D-D²'s
    absorption (removing more variance) makes worse, while S-D²'s added draw fills it."""
    from ..calibration import fp_trajectories
    from ..models import NoisePredictor
    from ..noise_model import by_channel
    from ..schedule import DDIMSchedule

    model = workbench.model(model_spec)
    config = CompareConfig(model=model_spec, w_bits=w_bits, a_bits=a_bits, steps=steps, eta=eta, guidance=guidance, backbone=backbone,
                           calib_samples=calib_samples or DEFAULT_CALIB_SAMPLES).validated(model)
    stats, _ = workbench.statistics(model, config.stats_config(model))
    q = NoisePredictor(workbench.quantized_network(model, stats), model.num_classes)
    schedule = DDIMSchedule(model.scheduler_config, steps, eta)
    table = stats.table(schedule, config.granularity)
    rows = []
    for batch in fp_trajectories(model, schedule, num_samples, seed, config.guidance, workbench.device):
        for coeff, x, eps in zip(schedule, batch.states, batch.eps):
            eps_hat = q(x, coeff.t, batch.labels, config.guidance)
            delta = (eps_hat - eps).float().cpu()
            e_mean = (eps_hat - stats.conditional_mean(eps_hat, coeff.index, config.granularity)).float().cpu()
            residual = eps.float().cpu() - e_mean
            per_channel = by_channel(delta)
            standardised = (per_channel - per_channel.mean(1, keepdim=True)) / per_channel.std(1, keepdim=True).clamp_min(1e-12)
            skew, kurt = _moments(standardised)
            res_c = by_channel(residual)
            r_skew, r_kurt = _moments((res_c - res_c.mean(1, keepdim=True)) / res_c.std(1, keepdim=True).clamp_min(1e-12))
            eps_c = eps.float().cpu()
            corr_e_res = float(torch.corrcoef(torch.stack([e_mean.flatten(), residual.flatten()]))[0, 1])
            fit = table.iloc[coeff.index]
            sigma_cond = float(fit["sigma_cond"])
            # The share of σ_t² that D-D² gave the residual: 1 − (σ_t'/σ_t)², from the σ_t' it applies.
            sigma_prime = torch.as_tensor(coeff.absorbed_sigma(stats.sigma_cond(config.granularity)[coeff.index]))
            rows.append(
                {
                    "model": model_spec, "backbone": backbone, "bits": f"W{w_bits}A{a_bits}", "eta": float(eta), "step": coeff.index,
                    "t": coeff.t, "rho": float(fit["rho"]), "sigma_delta": float(fit["sigma_delta"]), "sigma_cond": sigma_cond,
                    "sigma_t": coeff.sigma, "k_t": coeff.k,
                    "absorbed_share_of_sigma_t2": float(1 - (sigma_prime / coeff.sigma).pow(2).mean()) if coeff.sigma > 0 else 0.0,
                    "variance_absorbed": bool(fit["variance_absorbed"]),
                    "delta_skew": skew, "delta_excess_kurtosis": kurt,
                    "residual_skew": r_skew, "residual_excess_kurtosis": r_kurt,
                    "var_eps": float(eps_c.double().var()), "var_eps_hat": float(eps_hat.double().var()),
                    "var_e_mean_corrected": float(e_mean.double().var()), "var_residual": float(residual.double().var()),
                    "corr_e_residual": corr_e_res,
                    "rms_delta": float(delta.double().pow(2).mean().sqrt()),
                    "rms_residual": float(residual.double().pow(2).mean().sqrt()),
                }
            )
    return pd.DataFrame(rows)


def summarise_diagnostics(diag: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: means over steps of the per-step diagnostics."""
    keys = ["model", "backbone", "bits", "eta"]
    g = diag.groupby(keys, sort=False)
    out = g.agg(
        rho_mean=("rho", "mean"), rho_min=("rho", "min"), rho_max=("rho", "max"),
        sigma_delta_mean=("sigma_delta", "mean"), sigma_cond_mean=("sigma_cond", "mean"),
        delta_excess_kurtosis_median=("delta_excess_kurtosis", "median"),
        delta_excess_kurtosis_max=("delta_excess_kurtosis", "max"),
        residual_excess_kurtosis_median=("residual_excess_kurtosis", "median"),
        absorbed_share_mean=("absorbed_share_of_sigma_t2", "mean"),
        steps_absorbed=("variance_absorbed", "sum"),
        rms_delta_mean=("rms_delta", "mean"), rms_residual_mean=("rms_residual", "mean"),
    )
    ratio = diag.assign(ratio=diag["var_e_mean_corrected"] / diag["var_eps"]).groupby(keys, sort=False)["ratio"].mean()
    out["var_ratio_e_over_eps_mean"] = ratio
    return out.reset_index()


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: float, std: float | None = None) -> str:
    """Three significant figures or two decimals, the spread with as many decimals as the value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞"
    magnitude = abs(value) if value != 0 else 1.0
    if magnitude < 1e-3:
        text = f"{value:.2g}"
        return text + (f" ± {std:.1g}" if std is not None and not math.isnan(std) else "")
    decimals = 2 if magnitude >= 1 else max(2, 2 - int(math.floor(math.log10(magnitude))))
    if magnitude >= 1000:
        decimals = 0
    text = f"{value:.{decimals}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std:.{decimals}f}"
    return text


def markdown_table(frame: pd.DataFrame, columns: list[str], titles: dict[str, str] | None = None) -> str:
    titles = titles or {}
    head = "| " + " | ".join(titles.get(c, c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for _, row in frame.iterrows():
        cells = []
        for c in columns:
            value = row[c]
            if isinstance(value, (float, np.floating)):
                std = row.get(c + "_std")
                cells.append(_fmt(float(value), float(std) if std is not None and c + "_std" in frame.columns else None))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(table: pd.DataFrame, header: str = "") -> str:
    """One table per model and η; rows bit-width × method; mean ± std over seeds."""
    parts = [header] if header else []
    for (model, eta, guidance), block in table.groupby(["model", "eta", "guidance"], sort=False):
        metrics = [c for c in METRIC_COLUMNS if c in block.columns and block[c].notna().any()]
        block = block.copy()
        block["Method"] = block["label"]
        block["W/A"] = block["bits"]
        block["Backbone"] = block["backbone"]
        columns = ["W/A", "Backbone", "Method", "size_mb", "gbops", "compression", "bop_ratio", *metrics]
        titles = {"size_mb": "size MB", "gbops": "GBOPs", "compression": "compr.", "bop_ratio": "BOP ratio", **COLUMN_TITLES}
        for c in ("size_mb", "gbops", "compression", "bop_ratio"):
            block[c] = block[c].astype(float)
        seeds = int(block["seeds"].max())
        n = int(block["n_per_seed"].max())
        parts.append(f"### {model}, η = {eta:g}, guidance {guidance:g}  ({seeds} seeds × {n} samples; mean ± std over seeds)\n")
        parts.append(markdown_table(block.drop(columns=[c + "_std" for c in ("size_mb", "gbops", "compression", "bop_ratio") if c + "_std" in block]), columns, titles))
        parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Command


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models:
        raise ConfigError("model", args.model, "a comma-separated list of models")
    distances = tuple(d.strip().replace("-", "_").lower() for d in args.distances.split(",") if d.strip())
    for d in distances:
        if d not in DISTANCE_NAMES:
            raise ConfigError("distances", d, ", ".join(DISTANCE_NAMES))
    if args.num_samples < 2:
        raise ConfigError("num_samples", args.num_samples, "an integer ≥ 2")
    guidances = [None] if args.guidance is None else _floats("guidance", args.guidance)
    etas = _floats("eta", args.eta)
    backbones = tuple(b.strip() for b in args.backbones.split(",") if b.strip())
    for backbone in backbones or ("",):
        if backbone not in BACKBONES:
            raise ConfigError("backbones", backbone, ", ".join(BACKBONES))
    for eta in etas:
        check_eta(eta)
    return EvaluateConfig(
        models=models, bits=parse_bits(args.bits), etas=etas, guidances=guidances,
        methods=parse_methods(args.methods), seeds=_ints("seeds", args.seeds), num_samples=args.num_samples,
        steps=args.steps, calib_samples=args.calib_samples, distances=distances, diagnostics=args.diagnostics,
        diagnostic_samples=args.diagnostic_samples, backbones=backbones,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.merge:
        return merge_runs([Path(part) for part in args.merge], Path(args.out))

    from ..experiment import Workbench

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    workbench = Workbench(device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cells = [(m, w, a, e, g, s, b) for m in cfg.models for e in cfg.etas for g in cfg.guidances for b in cfg.backbones
             for (w, a) in cfg.bits for s in cfg.seeds]
    rows, diagnostics, notes = [], [], {}
    fp_done: set = set()
    suites: dict[str, DistanceSuite] = {}
    bar = tqdm(cells, desc="evaluate", unit="cell", file=sys.stderr, dynamic_ncols=True)
    for model_spec, w, a, eta, guidance, seed, backbone in bar:
        bar.set_postfix_str(f"{model_spec} {backbone} W{w}A{a} η={eta:g} seed {seed}")
        if model_spec not in suites:
            model = workbench.model(model_spec)
            dataset = (model.meta or {}).get("name", model_spec)  # a `d2dpm train` folder names its data
            suites[model_spec] = DistanceSuite(dataset, model.kind, tuple(model.sample_shape), set(cfg.distances), workbench.device,
                                               workbench.cache_dir, args.reference, model.conditional)
            notes[model_spec] = suites[model_spec].notes
        guidance_value = guidance
        fp_key = (model_spec, eta, guidance, seed)
        cell_rows, result = evaluate_cell(workbench, model_spec, w, a, eta, guidance_value, cfg, seed, suites[model_spec],
                                          progress=lambda f, m: bar.set_postfix_str(f"{model_spec} W{w}A{a} η={eta:g}: calibrating {f:.0%}"),
                                          include_fp=fp_key not in fp_done, backbone=backbone)
        fp_done.add(fp_key)
        rows.extend(cell_rows)
        if cfg.diagnostics and seed == cfg.seeds[0]:
            diagnostics.append(noise_diagnostics(workbench, model_spec, w, a, eta, result.config.guidance, cfg.steps, cfg.calib_samples,
                                                 cfg.diagnostic_samples, backbone=backbone))
        pd.DataFrame(rows).to_csv(out / "per_seed.csv", index=False)  # partial results survive an interruption
    bar.close()
    command = shlex.join(["d2dpm", *args.argv]) if getattr(args, "argv", None) else ""  # empty when called from Python
    header = (f"{cfg.steps} DDIM steps; seeds {','.join(map(str, cfg.seeds))}; {cfg.num_samples} samples per cell and seed; "
              f"device {workbench.device}, {torch.get_num_threads()} threads; {time.time() - started:.0f} s")
    run_info = {"config": dataclasses.asdict(cfg), "device": workbench.device, "seconds": round(time.time() - started, 1),
                "torch": torch.__version__, "notes": notes, "command": command, "threads": torch.get_num_threads()}
    write_results(out, pd.DataFrame(rows), pd.concat(diagnostics, ignore_index=True) if diagnostics else None,
                  header, [command] if command else [], notes, run_info)
    return 0


def write_results(out: Path, per_seed: pd.DataFrame, diagnostics: pd.DataFrame | None, header: str, commands: list[str],
                  notes: dict[str, list[str]], run_info: dict) -> None:
    """results.csv, per_seed.csv, results.md, diagnostics*.csv and run.json of one grid, in `out`."""
    per_seed.to_csv(out / "per_seed.csv", index=False)
    table = aggregate(per_seed)
    table.to_csv(out / "results.csv", index=False)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    markdown = results_markdown(table, f"# d2dpm evaluate\n\n{header}; {date}.\n" + "".join(f"\n    {c}\n" for c in commands))
    for model_spec, model_notes in notes.items():
        for note in model_notes:
            markdown += f"\n- {model_spec}: {note}"
    if diagnostics is not None:
        diagnostics.to_csv(out / "diagnostics.csv", index=False)
        summary = summarise_diagnostics(diagnostics)
        summary.to_csv(out / "diagnostics_summary.csv", index=False)
        markdown += "\n\n### Noise-model diagnostics (means over steps; fresh FP trajectories)\n\n" + markdown_table(summary, list(summary.columns))
    (out / "results.md").write_text(markdown + "\n")
    (out / "run.json").write_text(json.dumps({**run_info, "date": date}, indent=2, default=str))
    print(markdown)
    print(f"wrote results.csv, per_seed.csv, results.md{', diagnostics.csv' if diagnostics is not None else ''}, run.json to {out}")


def merge_runs(parts: list[Path], out: Path) -> int:
    """One table from a grid run in pieces, one `evaluate` per backbone side by side, say.

    The pieces must share steps and samples per seed, or their rows could not stand side by side.
    FP rows repeat identically in every piece (same seeds, same noise, no backbone): kept once.
    """
    runs, frames, diagnostics, grids = [], [], [], set()
    for part in parts:
        missing = [name for name in ("per_seed.csv", "run.json") if not (part / name).is_file()]
        if missing:
            raise ConfigError("merge", str(part), f"folders written by `d2dpm evaluate` (this one lacks {', '.join(missing)})")
        try:
            info = json.loads((part / "run.json").read_text())
            pieces = info.get("merged_from", [info])  # a merged folder brings the runs it was made of
            grids |= {(run["config"]["steps"], run["config"]["num_samples"]) for run in pieces}
            frame = pd.read_csv(part / "per_seed.csv")
        except (ValueError, KeyError, TypeError, AttributeError):
            pieces, frame = None, None
        if frame is None or not set(ROW_KEYS) <= set(frame.columns):
            raise ConfigError("merge", str(part), "folders written by `d2dpm evaluate` (this one's run.json or per_seed.csv "
                              "does not read as one)")
        runs += pieces
        frames.append(frame)
        if (part / "diagnostics.csv").is_file():
            diagnostics.append(pd.read_csv(part / "diagnostics.csv"))
    if len(grids) > 1:
        raise ConfigError("merge", ", ".join(f"{steps} steps × {samples} samples" for steps, samples in sorted(grids)),
                          "pieces of one grid, all with the same steps and samples per seed")
    per_seed = pd.concat(frames, ignore_index=True)
    per_seed = per_seed.drop_duplicates(subset=list(ROW_KEYS))
    first = runs[0]["config"]
    seeds = sorted(int(s) for s in per_seed["seed"].unique())
    notes: dict[str, list[str]] = {}
    for run in runs:
        for model_spec, model_notes in run.get("notes", {}).items():
            notes.setdefault(model_spec, [])
            notes[model_spec] += [note for note in model_notes if note not in notes[model_spec]]
    devices = sorted({f"{run.get('device')}, {run.get('threads')} threads" for run in runs})
    header = (f"{first['steps']} DDIM steps; seeds {','.join(map(str, seeds))}; {first['num_samples']} samples per cell and seed; "
              f"{len(runs)} runs merged ({' / '.join(devices)}; the longest {max(run.get('seconds', 0) for run in runs):.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, per_seed, pd.concat(diagnostics, ignore_index=True) if diagnostics else None, header,
                  [run["command"] for run in runs if run.get("command")], notes, {"merged_from": runs})
    return 0
