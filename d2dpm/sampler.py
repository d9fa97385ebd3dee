"""The DDIM sampler: several methods side by side, one record per method and step.

Every method starts from the same x_T and gets the same per-step noise z (and the same z' for
S-D²), so the rows of a comparison differ only by the network and the correction. Methods that
use the quantized network are batched into one forward per step, as are those that need the FP one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .corrections import Correction
from .models import NoisePredictor
from .schedule import DDIMSchedule


@dataclass
class SamplerNoise:
    """x_T, and per step the variance noise z and the S-D² noise z', from one seeded generator.

    Drawn in a fixed order whatever the methods, so a method's images do not depend on which
    other methods run beside it.
    """

    initial: torch.Tensor  # [N, *shape]
    variance: list[torch.Tensor]  # z for each step (diffusers' variance_noise)
    extra: list[torch.Tensor]  # z' for each step

    @classmethod
    def draw(cls, num_samples: int, sample_shape: tuple[int, ...], num_steps: int, seed: int, device="cpu") -> "SamplerNoise":
        generator = torch.Generator().manual_seed(int(seed))
        shape = (num_samples, *sample_shape)
        initial = torch.randn(shape, generator=generator)
        variance, extra = [], []
        for _ in range(num_steps):
            variance.append(torch.randn(shape, generator=generator).to(device))
            extra.append(torch.randn(shape, generator=generator).to(device))
        return cls(initial.to(device), variance, extra)


@dataclass
class StepRecord:
    """What one method did at one step."""

    method: str
    step: int  # 0 for the first (noisiest) step
    t: int
    x_t: torch.Tensor  # the state before the step
    eps: torch.Tensor  # E', the noise estimate the step used
    x0: torch.Tensor  # the predicted x_0
    sigma: float | torch.Tensor  # σ actually applied (σ_t or σ_t', per channel if a tensor)
    correction: torch.Tensor | None  # ε̂ − E', what the correction removed (None if none)
    x_prev: torch.Tensor  # the state after the step


@dataclass(frozen=True)
class Track:
    """One trajectory to run: a name, the network that drives it, and its correction."""

    name: str
    network: str  # "fp" or "q"
    correction: Correction


def sample(
    schedule: DDIMSchedule,
    predictors: dict[str, NoisePredictor],
    tracks: list[Track],
    noise: SamplerNoise,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> Iterator[dict[str, StepRecord]]:
    """Run every track through the schedule; yield {track name: StepRecord} once per step."""
    states = {track.name: noise.initial for track in tracks}
    num = noise.initial.shape[0]
    for coeff in schedule:
        # One forward per network over the states of every track that needs it.
        wants = {"fp": [], "q": []}
        for track in tracks:
            wants[track.network].append(track.name)
            if track.correction.needs_fp_eps and track.network != "fp":
                wants["fp"].append(track.name)
        outputs: dict[str, dict[str, torch.Tensor]] = {"fp": {}, "q": {}}
        for network, names in wants.items():
            if not names:
                continue
            batch = torch.cat([states[name] for name in names])
            batch_labels = labels.repeat(len(names)) if labels is not None else None
            eps = predictors[network](batch, coeff.t, batch_labels, guidance)
            outputs[network] = dict(zip(names, eps.split(num)))

        records = {}
        for track in tracks:
            eps_raw = outputs[track.network][track.name]
            corrected = track.correction(eps_raw, coeff, extra_noise=noise.extra[coeff.index], eps_fp=outputs["fp"].get(track.name))
            x_prev, x0 = schedule.step(states[track.name], corrected.eps, coeff, corrected.sigma, noise.variance[coeff.index])
            records[track.name] = StepRecord(
                method=track.name,
                step=coeff.index,
                t=coeff.t,
                x_t=states[track.name],
                eps=corrected.eps,
                x0=x0,
                sigma=corrected.sigma,
                correction=None if corrected.eps is eps_raw else eps_raw - corrected.eps,
                x_prev=x_prev,
            )
            states[track.name] = x_prev
        yield records
