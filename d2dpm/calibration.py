"""Calibration: one set of full-precision trajectories feeds both the quantizer and the noise model.

1. Run FP-driven DDIM trajectories through the one sampler (`sampler.sample`, a single FP track)
   while an `ActivationObserver` watches the FP network: every step's layer inputs are seen
   (time-step-aware calibration). The step records keep each step's x_t and FP output ε.
2. The quantizer: round to nearest from the observed ranges; for the `bias-correction` and
   `adaround` backbones, fitted layer by layer on network inputs drawn from those trajectories
   (`quant.reconstruct`), with a bias correction per calibrated step besides the one for all steps.
3. Evaluate the quantized network on the *same* x_t (guided the same way) and fit the joint
   Gaussian of (ε̂, Δ = ε̂ − ε) per step, plus PTQD's terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import StatsConfig
from .corrections import Correction
from .models import DiffusionModel, NoisePredictor, network_output
from .noise_model import NoiseStatistics, PairAccumulator
from .quant import ActivationObserver, concat_splits, quantize_network, reconstruct
from .sampler import SamplerNoise, Track, sample
from .schedule import DDIMSchedule

ProgressCallback = Callable[[float, str], None]
TRAJECTORY_BATCH = 256  # trajectories sampled side by side
# Network inputs (x_t, t, class) the backbone's layer-wise fitting sees: about 50 per step at 20
# steps for the per-step bias corrections.
RECONSTRUCTION_INPUTS = 1024


@dataclass
class Calibrated:
    quantized_network: nn.Module
    stats: NoiseStatistics


@dataclass
class FPTrajectories:
    """FP-driven trajectories of one batch: the class of each, and per step x_t and the FP output ε."""

    labels: torch.Tensor | None
    states: list[torch.Tensor]  # x_t per step
    eps: list[torch.Tensor]  # the (guided) FP output per step


def fp_trajectories(model: DiffusionModel, schedule: DDIMSchedule, count: int, seed: int, guidance: float, device,
                    on_step: Callable[[], None] | None = None) -> list[FPTrajectories]:
    """`count` trajectories of the FP network through the sampler, in batches of TRAJECTORY_BATCH.
    Batch b draws its classes and its sampler noise from seeds derived from (`seed`, b)."""
    fp = NoisePredictor(model.network, model.num_classes, chunked=False)  # one forward per step for the observer
    track = [Track("fp", "fp", Correction())]
    batches = []
    for index, start in enumerate(range(0, count, TRAJECTORY_BATCH)):
        size = min(TRAJECTORY_BATCH, count - start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        labels = torch.randint(0, model.num_classes, (size,), generator=generator).to(device) if model.conditional else None
        noise = SamplerNoise.draw(size, model.sample_shape, len(schedule), int(torch.randint(2**62, (1,), generator=generator)), device)
        states, eps = [], []
        for records in sample(schedule, {"fp": fp}, track, noise, labels, guidance):
            states.append(records["fp"].x_t)
            eps.append(records["fp"].eps)
            if on_step is not None:
                on_step()
        batches.append(FPTrajectories(labels, states, eps))
    return batches


def reconstruction_inputs(model: DiffusionModel, schedule: DDIMSchedule, batches: list[FPTrajectories], guidance: float,
                          count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`count` network inputs (x_t, t, class) drawn at random from the trajectories, every step
    alike: what the network is called on while sampling, so under guidance both the class and the
    null class (classifier-free guidance evaluates both)."""
    classes = [None]
    if model.conditional:
        classes = ["label"] if guidance == 1.0 else ["null"] if guidance == 0.0 else ["label", "null"]
    candidates = [(b, s, n, c) for b, batch in enumerate(batches) for s in range(len(schedule))
                  for n in range(batch.states[0].shape[0]) for c in classes]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(candidates), generator=generator)[:count].tolist()
    xs, ts, labels = [], [], []
    for b, s, n, c in (candidates[i] for i in picks):
        xs.append(batches[b].states[s][n])
        ts.append(schedule.steps[s].t)
        if c is not None:
            labels.append(int(batches[b].labels[n]) if c == "label" else model.num_classes)
    device = xs[0].device
    return (torch.stack(xs), torch.tensor(ts, device=device),
            torch.tensor(labels, device=device) if model.conditional else None)


def calibrate(model: DiffusionModel, config: StatsConfig, device="cpu", progress: ProgressCallback | None = None) -> Calibrated:
    """Calibrate the quantizer and fit the noise statistics for `config` (see the module doc)."""
    quant_config = config.quant_config()
    schedule = DDIMSchedule(model.scheduler_config, config.steps, config.eta)
    network = model.network.to(device)
    # Share of the progress bar per phase: trajectories, the backbone's fitting, the noise pairs.
    shares = {"rtn": (0.5, 0.0, 0.5), "bias-correction": (0.45, 0.1, 0.45), "adaround": (0.15, 0.7, 0.15)}[config.backbone]
    total_steps = len(schedule) * -(-config.calib_samples // TRAJECTORY_BATCH)
    done = 0

    def trajectory_step():
        nonlocal done
        done += 1
        if progress is not None:
            progress(shares[0] * done / total_steps, f"FP calibration trajectories: step {done}/{total_steps}")

    # 1. FP trajectories under observation.
    splits = concat_splits(network) if config.backbone == "adaround" else {}
    with ActivationObserver(network, seed=config.seed, splits=splits) as observer:
        batches = fp_trajectories(model, schedule, config.calib_samples, config.seed, config.guidance, device, trajectory_step)

    # 2. The quantizer: round to nearest, then the backbone's layer-wise fitting.
    quantizer = observer.round_to_nearest(quant_config)
    if config.backbone != "rtn":
        inputs = reconstruction_inputs(model, schedule, batches, config.guidance, RECONSTRUCTION_INPUTS, config.seed)

        def fitting(fraction: float, message: str):
            if progress is not None:
                progress(shares[0] + shares[1] * fraction, message)

        quantizer = reconstruct(network, quantizer, lambda net, args: network_output(net, *args), inputs,
                                learn_rounding_too=config.backbone == "adaround", progress=fitting, seed=config.seed)
    quantized = NoisePredictor(quantize_network(network, quantizer), model.num_classes)

    # 3. Quantized outputs on the same states; fit the per-step noise model.
    pairs = PairAccumulator(len(schedule), seed=config.seed)
    done = 0
    for batch in batches:
        for coeff, x, eps_fp in zip(schedule, batch.states, batch.eps):
            pairs.add(coeff.index, quantized(x, coeff.t, batch.labels, config.guidance), eps_fp)
            done += 1
            if progress is not None:
                progress(shares[0] + shares[1] + shares[2] * done / total_steps, f"quantization noise pairs: step {done}/{total_steps}")
    stats = pairs.fit(config, [c.t for c in schedule], quantizer)
    return Calibrated(quantized.network, stats)
