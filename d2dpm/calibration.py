"""Calibration: one set of full-precision trajectories feeds both the quantizer and the noise model.

1. Run FP-driven DDIM trajectories (the configuration's steps, η and guidance) with an
   `ActivationObserver` on the FP network: every step's layer inputs are seen
   (time-step-aware calibration). Keep each step's x_t and FP output ε.
2. Turn the observed ranges into the quantized network.
3. Evaluate the quantized network on the *same* x_t (guided the same way) and fit the joint
   Gaussian of (ε̂, Δ = ε̂ − ε) per step, plus PTQD's terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .models import DiffusionModel, NoisePredictor
from .noise_model import NoiseStatistics, PairAccumulator, StatsConfig
from .quant import ActivationObserver, QuantConfig, quantize_network
from .schedule import DDIMSchedule

ProgressCallback = Callable[[float, str], None]
CALIBRATION_BATCH = 64


@dataclass
class Calibrated:
    quantized_network: nn.Module
    stats: NoiseStatistics


def random_labels(model: DiffusionModel, count: int, generator: torch.Generator) -> torch.Tensor | None:
    if not model.conditional:
        return None
    return torch.randint(0, model.num_classes, (count,), generator=generator)


def calibrate(model: DiffusionModel, config: StatsConfig, device="cpu", progress: ProgressCallback | None = None) -> Calibrated:
    """Calibrate the quantizer and fit the noise statistics for `config` (see the module doc)."""
    quant_config = QuantConfig(config.w_bits, config.a_bits, config.range_method, config.keep_edge_layers_8bit)
    schedule = DDIMSchedule(model.scheduler_config, config.steps, config.eta)
    network = model.network.to(device)
    fp = NoisePredictor(network, model.num_classes)
    generator = torch.Generator().manual_seed(config.seed)
    batches = [min(CALIBRATION_BATCH, config.calib_samples - start) for start in range(0, config.calib_samples, CALIBRATION_BATCH)]
    total_work = 2 * len(batches) * len(schedule)
    done = 0

    def report(message: str):
        if progress is not None:
            progress(done / total_work, message)

    # 1. FP trajectories under observation; keep (x_t, ε) of every step.
    visited = []  # per batch: labels, [(x_t, eps_fp) per step]
    observer = ActivationObserver(network, seed=config.seed)
    with observer:
        for size in batches:
            labels = random_labels(model, size, generator)
            x = torch.randn((size, *model.sample_shape), generator=generator).to(device)
            labels = labels.to(device) if labels is not None else None
            steps = []
            for coeff in schedule:
                eps = fp(x, coeff.t, labels, config.guidance)
                steps.append((x, eps))
                z = torch.randn(x.shape, generator=generator).to(device)
                x, _ = schedule.step(x, eps, coeff, coeff.sigma, z)
                done += 1
                report(f"FP calibration trajectories: step {coeff.index + 1}/{len(schedule)}")
            visited.append((labels, steps))

    # 2. The quantizer from the observed ranges.
    ranges = observer.ranges(quant_config)
    quantized_network = quantize_network(network, ranges, quant_config.range_method)
    quantized = NoisePredictor(quantized_network, model.num_classes)

    # 3. Quantized outputs on the same states; fit the per-step noise model.
    pairs = PairAccumulator(len(schedule), seed=config.seed)
    for labels, steps in visited:
        for coeff, (x, eps_fp) in zip(schedule, steps):
            pairs.add(coeff.index, quantized(x, coeff.t, labels, config.guidance), eps_fp)
            done += 1
            report(f"quantization noise pairs: step {coeff.index + 1}/{len(schedule)}")
    stats = pairs.fit(config, [c.t for c in schedule], ranges)
    return Calibrated(quantized_network, stats)
