"""The ε-network of the toy 2-D model: an MLP that diffusers can save and load like a UNet."""

from __future__ import annotations

from dataclasses import dataclass

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
