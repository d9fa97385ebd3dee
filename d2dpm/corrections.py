"""Corrections wrap the quantized noise prediction; they never fork the sampler (docs/design.md: a correction wraps ε̂).

A correction takes the quantized output ε̂ at one step and returns the noise estimate E' the
DDIM step should use, and the σ it should apply (σ_t, or a reduced σ_t'). To use D²-DPM in
your own DDIM loop::

    correction = DualDenoising(stats, mode="deterministic")   # D-D²
    out = correction(eps_hat, coeff, extra_noise=torch.randn_like(eps_hat))
    x_prev, x0 = schedule.step(x_t, out.eps, coeff, out.sigma, z)

where `coeff` is the step's `StepCoefficients` (ᾱ_t, ᾱ_prev, σ_t, k_t) from `DDIMSchedule`.
Which correction a method name stands for is its entry in `d2dpm.methods.METHODS`; `make_correction`
builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .methods import ALLOWED_METHODS, METHODS
from .noise_model import NoiseStatistics, _broadcast_shape
from .schedule import StepCoefficients

MODES = ("deterministic", "stochastic")


@dataclass
class Corrected:
    eps: torch.Tensor  # E', the noise estimate handed to the DDIM step
    sigma: float | torch.Tensor  # the σ the step applies: σ_t, or σ_t' (per channel if a tensor)


class Correction:
    """No correction: E' = ε̂, σ = σ_t.

    Every subclass is registered by its class name in `Correction.kinds`, which is how an entry of the
    method registry (`d2dpm.methods.Method.correction`) names the class that makes it."""

    needs_fp_eps = False  # the oracle alone reads the FP output
    needs_stats = False  # whether it is made from noise statistics
    kinds: dict[str, type[Correction]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Correction.kinds[cls.__name__] = cls

    @classmethod
    def build(cls, stats: NoiseStatistics | None, granularity: str, **options) -> Correction:
        """The correction for a run's statistics and noise-model granularity, with a registry entry's options."""
        return cls(**options)

    def __call__(self, eps_hat: torch.Tensor, coeff: StepCoefficients, extra_noise=None, eps_fp=None) -> Corrected:
        return Corrected(eps_hat, coeff.sigma)


Correction.kinds["Correction"] = Correction  # its subclasses register themselves


def absorb_variance(coeff: StepCoefficients, residual_std: torch.Tensor | float, like: torch.Tensor) -> float | torch.Tensor:
    """σ_t' of `StepCoefficients.absorbed_sigma`, shaped to broadcast over `like` when per channel."""
    sigma_prime = coeff.absorbed_sigma(residual_std)
    if isinstance(sigma_prime, float):
        return sigma_prime
    return sigma_prime.to(like).view(_broadcast_shape(like, "channel"))


class DualDenoising(Correction):
    """D²-DPM (docs/method.md §3): remove the quantization noise's mean, then its variance.

    mode "stochastic" (S-D²): E' = ε̂ − μ_cond(ε̂) − σ_cond·z', the step unchanged.
    mode "deterministic" (D-D²): E' = ε̂ − μ_cond(ε̂), σ_t' absorbs k_t²·σ_cond² into the step's noise.
    `mean` / `variance` switch the two halves (the paper's ablation). With the mean off, the
    variance removed is the unconditional σ_Δ (nothing is conditioned on ε̂).
    """

    needs_stats = True

    def __init__(self, stats: NoiseStatistics, mode: str = "deterministic", mean: bool = True, variance: bool = True,
                 granularity: str = "channel"):
        if mode not in MODES:
            raise ConfigError("mode", mode, " or ".join(MODES))
        self.stats, self.mode, self.mean, self.variance, self.granularity = stats, mode, mean, variance, granularity
        residual = stats.sigma_cond(granularity) if mean else stats.sigma_delta(granularity)
        self.residual_std = residual  # [S] or [S, C]

    @classmethod
    def build(cls, stats, granularity, **options):
        return cls(stats, granularity=granularity, **options)

    def __call__(self, eps_hat, coeff, extra_noise=None, eps_fp=None) -> Corrected:
        _check_step(self.stats, coeff)
        eps, sigma = eps_hat, coeff.sigma
        # 1. mean deviation: subtract the conditional mean μ_cond(ε̂) (Algorithm 1, not Eq. 15's μ_Δ)
        if self.mean:
            eps = eps - self.stats.conditional_mean(eps_hat, coeff.index, self.granularity)
        # 2. variance deviation
        if self.variance:
            residual = self.residual_std[coeff.index]
            if self.mode == "stochastic":  # subtract a draw of the residual noise
                if extra_noise is None:
                    raise ValueError("S-D² needs extra_noise z' (a standard normal draw shaped like ε̂)")
                eps = eps - residual.to(eps).view(_broadcast_shape(eps, self.granularity)) * extra_noise
            else:  # absorb it into the step's own noise
                sigma = absorb_variance(coeff, residual, eps)
        return Corrected(eps, sigma)


class PTQDCorrection(Correction):
    """PTQD (docs/method.md §4): E' = (ε̂ − b_{t,c})/(1 + s_t) with PTQD's slope s_t, σ_t' absorbs (σ_q/(1 + s_t))²."""

    needs_stats = True

    def __init__(self, stats: NoiseStatistics):
        self.stats = stats

    @classmethod
    def build(cls, stats, granularity, **options):  # its bias is per channel, its slope per step, whatever the granularity
        return cls(stats, **options)

    def __call__(self, eps_hat, coeff, extra_noise=None, eps_fp=None) -> Corrected:
        _check_step(self.stats, coeff)
        i = coeff.index
        gain = 1.0 + float(self.stats.ptqd_slope[i])
        bias = self.stats.ptqd_bias[i].to(eps_hat).view(_broadcast_shape(eps_hat, "channel"))
        eps = (eps_hat - bias) / gain
        return Corrected(eps, absorb_variance(coeff, float(self.stats.ptqd_sigma[i]) / gain, eps_hat))


class OracleCorrection(Correction):
    """E' = ε̂ − Δ with the true Δ = ε̂ − ε: the best any correction of ε can do (teaching aid)."""

    needs_fp_eps = True

    def __call__(self, eps_hat, coeff, extra_noise=None, eps_fp=None) -> Corrected:
        if eps_fp is None:
            raise ValueError("the oracle needs the full-precision output eps_fp")
        return Corrected(eps_hat - (eps_hat - eps_fp), coeff.sigma)


def _check_step(stats: NoiseStatistics, coeff: StepCoefficients) -> None:
    if coeff.index >= len(stats.timesteps) or stats.timesteps[coeff.index] != coeff.t:
        raise ConfigError("stats", f"statistics for timesteps {stats.timesteps[:3]}…", f"statistics collected on this schedule (step {coeff.index} is t={coeff.t})")


def make_correction(method: str, stats: NoiseStatistics | None, granularity: str = "channel") -> Correction:
    """The correction a method name stands for: its registry entry's class and options (`d2dpm.methods`)."""
    if method not in METHODS:
        raise ConfigError("methods", method, ALLOWED_METHODS)
    entry = METHODS[method]
    kind = Correction.kinds[entry.correction]
    if kind.needs_stats and stats is None:
        raise ValueError(f"method {method} needs noise statistics")
    return kind.build(stats, granularity, **entry.kwargs)


@torch.no_grad()
def sample_with_dual_denoising(eps_model, schedule, stats: NoiseStatistics, x: torch.Tensor, variance_noise: list[torch.Tensor],
                               extra_noise: list[torch.Tensor], mode: str = "deterministic",
                               granularity: str = "channel") -> torch.Tensor:
    """D²-DPM sampling as the paper's Algorithm 1, for your own loop: `eps_model(x, t)` is the
    quantized network (guided if you guide), `x` the initial noise x_T, and per step the DDIM
    noise z and S-D²'s draw z'. Returns x_0. The sampler's D-D² / S-D² tracks do the same."""
    correction = DualDenoising(stats, mode, granularity=granularity)
    for coeff in schedule:  # from t = T down
        eps_hat = eps_model(x, coeff.t)  # the quantized prediction ε̂ = ε + Δ
        corrected = correction(eps_hat, coeff, extra_noise=extra_noise[coeff.index])  # E' and σ_t (S-D²) or σ_t' (D-D²)
        x, _ = schedule.step(x, corrected.eps, coeff, corrected.sigma, variance_noise[coeff.index])
    return x
