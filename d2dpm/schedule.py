"""The DDIM schedule and step (docs/method.md §3), with the paper's symbols.

Timesteps and ᾱ come from diffusers' own `DDIMScheduler` built from the model's scheduler
config, so the schedule is the reference one; the step is written out here because the
corrections need to change σ_t per step (and per channel), which `DDIMScheduler.step` cannot.
With an unchanged σ_t, `ddim_step` equals `DDIMScheduler.step` given the same variance noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from .config import check_eta
from .errors import ConfigError, check_int_range


@dataclass(frozen=True)
class StepCoefficients:
    """Everything one DDIM step t → t_prev needs, as plain floats."""

    index: int  # 0 for the first (noisiest) step
    t: int
    t_prev: int  # negative at the last step: ᾱ_prev is then the scheduler's final ᾱ
    alpha_bar: float  # ᾱ_t
    alpha_bar_prev: float  # ᾱ_prev
    sigma: float  # σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)
    k: float  # k_t = sqrt(1 − ᾱ_prev − σ_t²) − sqrt(ᾱ_prev (1 − ᾱ_t)/ᾱ_t): gain of an error in E on x_prev

    def absorbed_sigma(self, residual_std: float | torch.Tensor) -> float | torch.Tensor:
        """σ_t' = sqrt(σ_t² − k_t² σ_res²) if k_t² σ_res² < σ_t², else 0 (the official code's clamp):
        the step noise left once the residual quantization noise σ_res (scalar, or one per channel)
        has taken its share, k_t being its gain on x_prev (docs/method.md §3). k_t uses the original
        σ_t, as PTQD and D²-DPM do.

        At η = 0, σ_t = 0 and nothing can be absorbed: σ_t itself (0.0) comes back, so the step is
        bit-identical to the uncorrected one. Returns a float for a scalar σ_res, else a float64
        tensor with one σ_t' per channel. The one place σ_t' is computed: the corrections apply it,
        the statistics table and the Deviation view show it."""
        if self.sigma == 0.0:
            return self.sigma
        residual = torch.as_tensor(residual_std, dtype=torch.float64)
        sigma_prime = (self.sigma**2 - self.k**2 * residual**2).clamp_min(0.0).sqrt()
        return float(sigma_prime) if sigma_prime.dim() == 0 else sigma_prime

    def variance_absorbed(self, residual_std: float | torch.Tensor) -> bool | torch.Tensor:
        """Whether σ_t' could take the residual variance in full (k_t² σ_res² < σ_t²), per channel if given per channel."""
        residual = torch.as_tensor(residual_std, dtype=torch.float64)
        absorbed = self.k**2 * residual**2 < self.sigma**2
        return bool(absorbed) if absorbed.dim() == 0 else absorbed


class DDIMSchedule:
    """The S steps of DDIM sampling with stochasticity η for one diffusers scheduler config."""

    def __init__(self, scheduler_config: dict, num_steps: int, eta: float):
        scheduler = DDIMScheduler.from_config(dict(scheduler_config))
        train_steps = int(scheduler.config.num_train_timesteps)
        self.num_steps = check_int_range("steps", num_steps, 1, train_steps)
        self.eta = check_eta(eta)
        if scheduler.config.prediction_type != "epsilon":
            raise ConfigError(
                "model", f"prediction_type={scheduler.config.prediction_type}", "an ε-prediction model (prediction_type='epsilon')"
            )
        if scheduler.config.thresholding:  # dynamic thresholding of x_0 is not part of the step written below
            raise ConfigError("model", "a scheduler config with thresholding=True",
                              "a scheduler without dynamic thresholding (thresholding=False; clip_sample is supported)")
        scheduler.set_timesteps(self.num_steps)
        self.train_steps = train_steps
        self.clip_sample_range = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
        alphas_cumprod = scheduler.alphas_cumprod.double()
        final_alpha_bar = float(scheduler.final_alpha_cumprod)
        stride = train_steps // self.num_steps  # diffusers' DDIM always steps back by T // S
        self.steps: list[StepCoefficients] = []
        for index, t in enumerate(int(t) for t in scheduler.timesteps):
            t_prev = t - stride
            alpha_bar = float(alphas_cumprod[t])
            alpha_bar_prev = float(alphas_cumprod[t_prev]) if t_prev >= 0 else final_alpha_bar
            variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
            sigma = self.eta * math.sqrt(variance)
            k = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) - math.sqrt(alpha_bar_prev * (1 - alpha_bar) / alpha_bar)
            self.steps.append(StepCoefficients(index, t, t_prev, alpha_bar, alpha_bar_prev, sigma, k))

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self):
        return iter(self.steps)

    def step(
        self,
        x_t: torch.Tensor,
        eps: torch.Tensor,
        coeff: StepCoefficients,
        sigma: float | torch.Tensor,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t → x_prev with the noise estimate E = ``eps`` and noise scale s = ``sigma``.

        ``sigma`` is σ_t, or a corrected σ_t' (a float, or a tensor broadcastable to x_t, e.g. per
        channel). Returns (x_prev, predicted x_0).
        """
        # 1. predicted x_0 = (x_t − sqrt(1 − ᾱ_t)·E) / sqrt(ᾱ_t)
        x0 = (x_t - math.sqrt(1 - coeff.alpha_bar) * eps) / math.sqrt(coeff.alpha_bar)
        # 2. clip x_0 where the scheduler config asks for it (diffusers' clip_sample)
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        # 3. direction pointing to x_t: sqrt(1 − ᾱ_prev − s²)·E
        if isinstance(sigma, torch.Tensor):
            direction = torch.sqrt((1 - coeff.alpha_bar_prev - sigma**2).clamp_min(0)) * eps
        else:
            direction = math.sqrt(max(1 - coeff.alpha_bar_prev - sigma**2, 0.0)) * eps
        # 4. x_prev = sqrt(ᾱ_prev)·x_0 + direction + s·z
        x_prev = math.sqrt(coeff.alpha_bar_prev) * x0 + direction
        if noise is not None and (isinstance(sigma, torch.Tensor) or sigma > 0):
            x_prev = x_prev + sigma * noise
        return x_prev, x0
