"""The time-step-wise quantization noise model (docs/method.md §2) and PTQD's statistics (§4).

At every sampling step the quantized output X = ε̂ and the noise Y = Δ = ε̂ − ε are modelled as
a joint Gaussian, tensor-wise (one bivariate Gaussian per step) and channel-wise (one per step
and channel). Conditioned on the observed ε̂:

    μ_cond(ε̂) = μ_Y + ρ (σ_Y / σ_X) (ε̂ − μ_X),     σ_cond = σ_Y sqrt(1 − ρ²)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import StatsConfig, check_granularity
from .errors import ConfigError
from .quant import Quantizer

RHO_LIMIT = 0.9999
OUTLIER_SIGMAS = 4.0
PAIRS_KEPT_FOR_FIGURES = 4096
FIT_KEYS = ("mu_x", "mu_y", "var_x", "var_y", "cov", "n")


def fit_joint_gaussian(x: torch.Tensor, y: torch.Tensor, outlier_sigmas: float = OUTLIER_SIGMAS) -> dict[str, torch.Tensor]:
    """Fit (X, Y) ~ N(μ, Σ) along the last axis, per leading index (e.g. per channel).

    Pairs whose |Y − mean Y| exceeds `outlier_sigmas`·std Y are dropped first; then the
    2-vector mean and the unbiased 2×2 covariance of the kept pairs. Returns tensors of the
    leading shape: mu_x, mu_y, var_x, var_y, cov, n.
    """
    x, y = x.double(), y.double()
    keep = (y - y.mean(-1, keepdim=True)).abs() <= outlier_sigmas * y.std(-1, keepdim=True)
    n = keep.sum(-1)
    mu_x = (x * keep).sum(-1) / n
    mu_y = (y * keep).sum(-1) / n
    dx, dy = (x - mu_x[..., None]) * keep, (y - mu_y[..., None]) * keep
    return {
        "mu_x": mu_x,
        "mu_y": mu_y,
        "var_x": dx.pow(2).sum(-1) / (n - 1),
        "var_y": dy.pow(2).sum(-1) / (n - 1),
        "cov": (dx * dy).sum(-1) / (n - 1),
        "n": n.double(),
    }


def by_channel(tensor: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] → [C, N·...]: the elements of each channel in one row."""
    return tensor.transpose(0, 1).reshape(tensor.shape[1], -1)


@dataclass
class NoiseStatistics:
    """Per-step fits, tensor-wise ([S]) and channel-wise ([S, C]), and PTQD's per-step terms."""

    config: StatsConfig
    timesteps: list[int]
    tensor: dict[str, torch.Tensor]  # mu_x, mu_y, var_x, var_y, cov, n: each [S]
    channel: dict[str, torch.Tensor]  # the same, each [S, C]
    ptqd_slope: torch.Tensor  # [S] slope of Δ on the FP output, clipped ≥ 0
    ptqd_bias: torch.Tensor  # [S, C] mean of Δ per channel
    ptqd_sigma: torch.Tensor  # [S] std of the residual Δ − k·ε
    pair_sample: torch.Tensor  # [S, 2, K] a random subset of (ε̂, Δ) pairs per step, for figures
    quantizer: Quantizer  # the quantized network these statistics belong to

    # -- the conditional model (docs/method.md §2)

    def _fit(self, granularity: str) -> dict[str, torch.Tensor]:
        check_granularity(granularity)
        return self.channel if granularity == "channel" else self.tensor

    def rho(self, granularity: str = "channel") -> torch.Tensor:
        fit = self._fit(granularity)
        return (fit["cov"] / (fit["var_x"] * fit["var_y"]).sqrt()).clamp(-RHO_LIMIT, RHO_LIMIT)

    def sigma_cond(self, granularity: str = "channel") -> torch.Tensor:
        """σ_cond = σ_Y sqrt(1 − ρ²), per step (and channel)."""
        return self._fit(granularity)["var_y"].sqrt() * (1 - self.rho(granularity) ** 2).sqrt()

    def sigma_delta(self, granularity: str = "channel") -> torch.Tensor:
        """The unconditional σ_Y, per step (and channel)."""
        return self._fit(granularity)["var_y"].sqrt()

    def conditional_mean(self, eps_hat: torch.Tensor, step: int, granularity: str = "channel") -> torch.Tensor:
        """μ_cond(ε̂) = μ_Y + ρ (σ_Y / σ_X)(ε̂ − μ_X), elementwise, for step index `step`."""
        fit = self._fit(granularity)
        rho = self.rho(granularity)[step]
        slope = rho * (fit["var_y"][step] / fit["var_x"][step]).sqrt()
        mu_x, mu_y = fit["mu_x"][step], fit["mu_y"][step]
        shape = _broadcast_shape(eps_hat, granularity)
        mu_x, mu_y, slope = (value.to(eps_hat).view(shape) for value in (mu_x, mu_y, slope))
        return mu_y + slope * (eps_hat - mu_x)

    # -- tables

    def table(self, schedule, granularity: str = "channel") -> pd.DataFrame:
        """One row per step: the schedule, the tensor-wise fit, PTQD's terms, and the σ_t' that D-D²
        applies at `granularity` (the run's): `sigma_t_prime` when tensor-wise, one column
        `sigma_t_prime_c<c>` per channel when channel-wise; `variance_absorbed` is True where every
        channel took its residual variance in full (k_t² σ_cond² < σ_t²)."""
        rho, sigma_cond = self.rho("tensor"), self.sigma_cond("tensor")
        residual = self.sigma_cond(granularity)
        rows = []
        for i, coeff in enumerate(schedule.steps):
            row = {
                "step": i,
                "t": coeff.t,
                "alpha_bar": coeff.alpha_bar,
                "sigma_t": coeff.sigma,
                "k_t": coeff.k,
                "mu_eps_hat": float(self.tensor["mu_x"][i]),
                "mu_delta": float(self.tensor["mu_y"][i]),
                "sigma_eps_hat": float(self.tensor["var_x"][i].sqrt()),
                "sigma_delta": float(self.tensor["var_y"][i].sqrt()),
                "rho": float(rho[i]),
                "sigma_cond": float(sigma_cond[i]),
            }
            sigma_prime = torch.as_tensor(coeff.absorbed_sigma(residual[i]), dtype=torch.float64).expand(residual[i].shape)
            if granularity == "tensor":
                row["sigma_t_prime"] = float(sigma_prime)
            else:
                row |= {f"sigma_t_prime_c{c}": float(value) for c, value in enumerate(sigma_prime)}
            row["variance_absorbed"] = bool(torch.as_tensor(coeff.variance_absorbed(residual[i])).all())
            row |= {
                "ptqd_slope": float(self.ptqd_slope[i]),
                "ptqd_bias": float(self.ptqd_bias[i].mean()),
                "ptqd_sigma_q": float(self.ptqd_sigma[i]),
                "n_pairs": int(self.tensor["n"][i]),
            }
            rows.append(row)
        return pd.DataFrame(rows)

    def channel_table(self) -> pd.DataFrame:
        """One row per step and channel: the channel-wise fit."""
        rho, sigma_cond = self.rho("channel"), self.sigma_cond("channel")
        steps, channels = rho.shape
        return pd.DataFrame(
            {
                "step": np.repeat(np.arange(steps), channels),
                "t": np.repeat(self.timesteps, channels),
                "channel": np.tile(np.arange(channels), steps),
                "mu_eps_hat": self.channel["mu_x"].flatten().numpy(),
                "mu_delta": self.channel["mu_y"].flatten().numpy(),
                "sigma_eps_hat": self.channel["var_x"].sqrt().flatten().numpy(),
                "sigma_delta": self.channel["var_y"].sqrt().flatten().numpy(),
                "rho": rho.flatten().numpy(),
                "sigma_cond": sigma_cond.flatten().numpy(),
            }
        )

    # -- files: safetensors for the tensors, the configuration as JSON in its metadata

    def save(self, path) -> None:
        tensors = {f"tensor.{k}": v.contiguous() for k, v in self.tensor.items()}
        tensors |= {f"channel.{k}": v.contiguous() for k, v in self.channel.items()}
        tensors |= {
            "ptqd.slope": self.ptqd_slope,
            "ptqd.bias": self.ptqd_bias,
            "ptqd.sigma": self.ptqd_sigma,
            "pair_sample": self.pair_sample.half(),  # for figures only: half precision keeps shipped files small
            "timesteps": torch.tensor(self.timesteps),
        }
        tensors |= self.quantizer.to_tensors()
        save_file(tensors, str(path), metadata={"config": self.config.to_json()})

    @classmethod
    def load(cls, path, expected: StatsConfig | None = None) -> "NoiseStatistics":
        """Read a statistics file; refuse a corrupted file or one made for another configuration."""
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                config = StatsConfig(**json.loads(handle.metadata()["config"]))
        except FileNotFoundError:
            raise ConfigError("stats", str(path), "an existing statistics file written by `d2dpm stats`") from None
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise ConfigError("stats", str(path), f"a statistics file written by `d2dpm stats` (this one is unreadable: {error})") from None
        if expected is not None and config != expected:
            raise ConfigError("stats", str(path), "statistics made for this configuration; mismatch in " + "; ".join(config.differences(expected)))
        try:
            stats = cls(
                config=config,
                timesteps=[int(t) for t in tensors["timesteps"]],
                tensor={key: tensors[f"tensor.{key}"] for key in FIT_KEYS},
                channel={key: tensors[f"channel.{key}"] for key in FIT_KEYS},
                ptqd_slope=tensors["ptqd.slope"],
                ptqd_bias=tensors["ptqd.bias"],
                ptqd_sigma=tensors["ptqd.sigma"],
                pair_sample=tensors["pair_sample"].float(),
                quantizer=Quantizer.from_tensors(config.backbone, tensors),
            )
        except (KeyError, ValueError, RuntimeError) as error:
            raise ConfigError("stats", str(path), f"a complete statistics file written by `d2dpm stats` (missing or broken entry: {error})") from None
        if any(len(v) != config.steps for v in (stats.timesteps, stats.ptqd_slope, *stats.tensor.values())):
            raise ConfigError("stats", str(path), "a complete statistics file written by `d2dpm stats` (its per-step tables are incomplete)")
        return stats


def _broadcast_shape(reference: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector over [N, C, ...] (or a scalar for tensor-wise)."""
    if granularity == "tensor":
        return ()
    return (1, -1) + (1,) * (reference.dim() - 2)


class PairAccumulator:
    """Collects the (ε̂, Δ, ε) triples of each step from calibration batches, then fits."""

    def __init__(self, num_steps: int, seed: int):
        self.eps_hat: list[list[torch.Tensor]] = [[] for _ in range(num_steps)]
        self.eps_fp: list[list[torch.Tensor]] = [[] for _ in range(num_steps)]
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, step: int, eps_hat: torch.Tensor, eps_fp: torch.Tensor) -> None:
        self.eps_hat[step].append(eps_hat.detach().float().cpu())
        self.eps_fp[step].append(eps_fp.detach().float().cpu())

    def fit(self, config: StatsConfig, timesteps: list[int], quantizer: Quantizer) -> NoiseStatistics:
        tensor_fits, channel_fits = [], []
        ptqd_slope, ptqd_bias, ptqd_sigma, pair_sample = [], [], [], []
        for eps_hat_batches, eps_fp_batches in zip(self.eps_hat, self.eps_fp):
            eps_hat = by_channel(torch.cat(eps_hat_batches))  # [C, M]
            eps_fp = by_channel(torch.cat(eps_fp_batches))
            delta = eps_hat - eps_fp
            tensor_fits.append(fit_joint_gaussian(eps_hat.flatten(), delta.flatten()))
            channel_fits.append(fit_joint_gaussian(eps_hat, delta))
            # PTQD (§4): least squares Δ ≈ k·ε + b over all elements, k clipped at 0; b per channel
            eps_flat, delta_flat = eps_fp.flatten().double(), delta.flatten().double()
            centred_eps = eps_flat - eps_flat.mean()
            slope = float((centred_eps * (delta_flat - delta_flat.mean())).sum() / centred_eps.pow(2).sum())
            slope = max(slope, 0.0)
            ptqd_slope.append(slope)
            ptqd_bias.append(delta.double().mean(dim=1))
            ptqd_sigma.append(float((delta_flat - slope * eps_flat).std()))
            picks = torch.randint(0, eps_hat.numel(), (min(PAIRS_KEPT_FOR_FIGURES, eps_hat.numel()),), generator=self.generator)
            pair_sample.append(torch.stack([eps_hat.flatten()[picks], delta.flatten()[picks]]))

        def stack(fits: list[dict]) -> dict[str, torch.Tensor]:
            return {key: torch.stack([fit[key] for fit in fits]) for key in fits[0]}

        return NoiseStatistics(
            config=config,
            timesteps=list(timesteps),
            tensor=stack(tensor_fits),
            channel=stack(channel_fits),
            ptqd_slope=torch.tensor(ptqd_slope, dtype=torch.float64),
            ptqd_bias=torch.stack(ptqd_bias),
            ptqd_sigma=torch.tensor(ptqd_sigma, dtype=torch.float64),
            pair_sample=torch.stack(pair_sample),
            quantizer=quantizer,
        )
