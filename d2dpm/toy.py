"""The toy 2-D model: its data, a Gaussian mixture whose density is known exactly (the Trajectories
view draws it, the evaluation measures against it), and its ε-network, an MLP that diffusers
can save and load like a UNet."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class ToyEpsMLPOutput(BaseOutput):
    sample: torch.Tensor  # predicted noise ε, [N, 2]


class ToyEpsMLP(ModelMixin, ConfigMixin):
    """ε_θ(x_t, t) for points: sinusoidal time embedding, then an MLP of `num_layers` SiLU layers.

    Unconditional; the `class_labels` argument exists so that callers can treat it like
    `UNet2DModel` (`network(x, t, class_labels=...)`), and it must be None.
    """

    @register_to_config
    def __init__(self, sample_size: int = 2, hidden_size: int = 256, num_layers: int = 4, time_embedding_dim: int = 64,
                 input_frequencies: int = 0):
        super().__init__()
        # The same sinusoidal features and 2-layer projection as UNet2DModel's time embedding.
        self.time_proj = Timesteps(time_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embedding_dim, hidden_size)
        # Fourier features of the point itself, sin/cos(2^k·x) for k < input_frequencies: a plain MLP
        # on (x, y) is biased towards smooth functions and learns a blurred cloud instead of thin
        # rings and spirals (the "spectral bias"; Tancik et al. 2020).
        self.register_buffer("frequencies", 2.0 ** torch.arange(input_frequencies, dtype=torch.float32), persistent=False)
        input_size = sample_size * (1 + 2 * input_frequencies)
        layers: list[nn.Module] = [nn.Linear(input_size + hidden_size, hidden_size), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_size, hidden_size), nn.SiLU()]
        layers.append(nn.Linear(hidden_size, sample_size))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ToyEpsMLPOutput | tuple[torch.Tensor]:
        if class_labels is not None:
            raise ValueError("ToyEpsMLP is unconditional: class_labels must be None")
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        # Timesteps always returns float32; follow the sample's dtype as UNet2DModel does.
        time_features = self.time_proj(timesteps).to(sample.dtype)
        embedding = self.time_embedding(time_features)
        angles = (sample[:, :, None] * self.frequencies.to(sample.dtype)).flatten(1)
        eps = self.mlp(torch.cat([sample, angles.sin(), angles.cos(), embedding], dim=1))
        return ToyEpsMLPOutput(sample=eps) if return_dict else (eps,)


# The toy 2-D distribution: a Gaussian mixture, so its density is exact. Half the mass is a ring
# of 8 round Gaussians; the other half is a spiral drawn as a chain of small overlapping Gaussians
# (spaced by arc length, 1.75 std apart, so it reads as a continuous band). The whole mixture is
# then centred and scaled to unit variance per coordinate.
TOY_RING_MODES = 8
TOY_RING_RADIUS = 2.0
TOY_RING_STD = 0.12
TOY_SPIRAL_COMPONENTS = 64
TOY_SPIRAL_RADII = (0.3, 1.5)  # Archimedean, inner to outer radius over 1.5 turns
TOY_SPIRAL_TURNS = 1.5
TOY_SPIRAL_STD = 0.08


def _toy_mixture_unscaled() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ring_angles = 2 * math.pi * np.arange(TOY_RING_MODES) / TOY_RING_MODES
    ring = TOY_RING_RADIUS * np.stack([np.cos(ring_angles), np.sin(ring_angles)], 1)
    # Place the spiral's components at equal arc-length steps along r(θ) = r0 + (r1 − r0) θ / θ_max.
    theta_max = 2 * math.pi * TOY_SPIRAL_TURNS
    fine = np.linspace(0.0, theta_max, 20001)
    radius = TOY_SPIRAL_RADII[0] + (TOY_SPIRAL_RADII[1] - TOY_SPIRAL_RADII[0]) * fine / theta_max
    points = np.stack([radius * np.cos(fine), radius * np.sin(fine)], 1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    theta = np.interp(np.linspace(0.0, arc[-1], TOY_SPIRAL_COMPONENTS), arc, fine)
    spiral_radius = np.interp(theta, fine, radius)
    spiral = np.stack([spiral_radius * np.cos(theta), spiral_radius * np.sin(theta)], 1)
    means = np.concatenate([ring, spiral])
    stds = np.concatenate([np.full(TOY_RING_MODES, TOY_RING_STD), np.full(TOY_SPIRAL_COMPONENTS, TOY_SPIRAL_STD)])
    weights = np.concatenate([np.full(TOY_RING_MODES, 0.5 / TOY_RING_MODES), np.full(TOY_SPIRAL_COMPONENTS, 0.5 / TOY_SPIRAL_COMPONENTS)])
    return means, stds, weights


def _toy_mixture() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    means, stds, weights = _toy_mixture_unscaled()
    center = weights @ means
    # Per-coordinate variance of the mixture, averaged over x and y: E|x − c|² / 2.
    variance = (weights * (np.sum((means - center) ** 2, axis=1) + 2 * stds**2)).sum() / 2
    scale = 1.0 / math.sqrt(variance)
    return (
        torch.tensor((means - center) * scale, dtype=torch.float32),
        torch.tensor(stds * scale, dtype=torch.float32),
        torch.tensor(weights, dtype=torch.float32),
        scale,
    )


TOY_MEANS, TOY_STDS, TOY_WEIGHTS, TOY_SCALE = _toy_mixture()
TOY_RING_SLICE = slice(0, TOY_RING_MODES)  # rows of TOY_MEANS/TOY_STDS that are ring modes


def sample_toy2d(n: int, generator: torch.Generator | None = None, return_components: bool = False):
    """n points [n, 2] from the toy mixture; with return_components, also each point's component index."""
    components = torch.multinomial(TOY_WEIGHTS, n, replacement=True, generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    points = TOY_MEANS[components] + TOY_STDS[components, None] * noise
    return (points, components) if return_components else points


def toy2d_log_density(points: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) [N] of the toy mixture at points [N, 2] (isotropic Gaussian components)."""
    points = points.float()
    squared = ((points[:, None, :] - TOY_MEANS[None]) ** 2).sum(-1)
    log_normal = -squared / (2 * TOY_STDS**2) - torch.log(2 * math.pi * TOY_STDS**2)
    return torch.logsumexp(torch.log(TOY_WEIGHTS) + log_normal, dim=1)
