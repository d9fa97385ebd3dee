"""Synthetic ε-networks whose outputs and quantization noise have known statistics.

`GaussianDataEps` is the exact ε-predictor for data distributed as N(0, I): E[ε | x_t] =
sqrt(1 − ᾱ_t)·x_t. `NoisyCopy` plays a "quantized" network: the FP output plus
Δ = slope·ε + bias_c(t) + std_c(t)·n, n ~ N(0, 1), with n a deterministic function of the
input row (seeded by its bytes), so two rows with the same input get the same noise, as a real
quantized network would.
"""

from __future__ import annotations

import zlib

import torch
from diffusers import DDIMScheduler
from torch import nn

from conftest import SCHEDULER_CONFIG

ALPHAS_CUMPROD = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod


def time_profile(t: torch.Tensor) -> torch.Tensor:
    """How the injected noise varies with t: 1 at t = 0, 2 at t = 1000."""
    return 1.0 + t.float() / 1000.0


def row_noise(row: torch.Tensor, t: int) -> torch.Tensor:
    """Standard normal noise seeded by the bytes of one input row and t."""
    seed = zlib.crc32(row.detach().cpu().numpy().tobytes()) ^ (t * 2654435761 % 2**32)
    return torch.randn(row.shape, generator=torch.Generator().manual_seed(seed))


class GaussianDataEps(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1 - ALPHAS_CUMPROD[t]).float().view(-1, *[1] * (x.dim() - 1)) * x


class NoisyCopy(nn.Module):
    def __init__(self, fp: nn.Module, bias: list[float], std: list[float], slope: float = 0.0):
        super().__init__()
        self.fp, self.slope = fp, slope
        self.register_buffer("bias", torch.tensor(bias))
        self.register_buffer("std", torch.tensor(std))

    def expected(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The injected noise's per-channel mean and std at timestep t (before the slope term)."""
        profile = time_profile(torch.tensor(t))
        return self.bias * profile, self.std * profile

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.fp(x, t)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        profile = time_profile(t).view(-1, *[1] * (x.dim() - 1))
        normal = torch.stack([row_noise(row, int(step)) for row, step in zip(x, t)])
        return eps + self.slope * eps + profile * (self.bias.view(shape) + self.std.view(shape) * normal)
