"""How much error in ε sends a deterministic trajectory to another sample: the quantized network's
error against white noise of known size, on the same images.

    python scripts/flip_sensitivity.py --w-bits 8 --a-bits 8 --backbone bias-correction

On the images of `d2dpm compare --eta 0 --seed S --num-images N` (guidance and statistics as there:
shipped, cached or calibrated now), it prints

1. the RMS of the quantized network's error in the guided ε along the FP trajectory, per step;
2. for white Gaussian noise of each σ added to the FP network's guided ε at every step, over
   several draws of that noise: the mean PSNR of the N images to FP's, the lowest image's PSNR and
   how many images end below 25 dB (another sample than FP's, at the emoji model's scale);
3. the same for the quantized network itself.

If white noise of the quantized error's size already moves the mean by several decibels from draw
to draw, an N-image PSNR mostly counts which trajectories flip (docs/quantization.md).
"""

from __future__ import annotations

import argparse

import torch

from d2dpm.config import CompareConfig
from d2dpm.corrections import Correction
from d2dpm.experiment import Workbench
from d2dpm.metrics import per_image_errors
from d2dpm.models import NoisePredictor
from d2dpm.sampler import SamplerNoise, Track, sample
from d2dpm.schedule import DDIMSchedule

FLIPPED_BELOW_DB = 25.0


class WithWhiteNoise:
    """The FP predictor with N(0, σ²) added to every element of its guided ε, from its own generator."""

    def __init__(self, predictor: NoisePredictor, sigma: float, seed: int):
        self.predictor, self.sigma = predictor, sigma
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x, t, labels, guidance):
        eps = self.predictor(x, t, labels, guidance)
        return eps + self.sigma * torch.randn(eps.shape, generator=self.generator).to(eps.device)


def final_samples(schedule, predictor, noise, labels, guidance) -> torch.Tensor:
    for records in sample(schedule, {"fp": predictor}, [Track("run", "fp", Correction())], noise, labels, guidance):
        pass
    return records["run"].x_prev


def describe(name: str, samples: torch.Tensor, reference: torch.Tensor, kind: str) -> str:
    _, psnr = per_image_errors(samples, reference, kind)
    flipped = int((psnr < FLIPPED_BELOW_DB).sum())
    return f"{name}: mean {float(psnr.mean()):.1f} dB, lowest image {float(psnr.min()):.1f} dB, {flipped} of {len(psnr)} below {FLIPPED_BELOW_DB:g} dB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="emoji")
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--backbone", default="bias-correction", choices=["rtn", "bias-correction", "adaround"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--sigmas", default="0.003,0.01,0.03,0.05", help="comma-separated σ of the white noise")
    parser.add_argument("--draws", type=int, default=3, help="draws of the white noise per σ")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    workbench = Workbench(device="cpu")
    config = CompareConfig(model=args.model, w_bits=args.w_bits, a_bits=args.a_bits, eta=0.0, backbone=args.backbone,
                           methods=("fp", "q"), seed=args.seed, num_images=args.num_images)
    model = workbench.model(config.model)
    config = config.validated(model)
    stats, source = workbench.statistics(model, config.stats_config(model))
    schedule = DDIMSchedule(model.scheduler_config, config.steps, 0.0)
    noise = SamplerNoise.draw(config.num_images, model.sample_shape, config.steps, config.seed)
    labels = Workbench.image_labels(model, config)
    fp = NoisePredictor(model.network, model.num_classes)
    quantized = NoisePredictor(workbench.quantized_network(model, stats), model.num_classes)
    print(f"{model.identity}, W{config.w_bits}A{config.a_bits} {config.backbone} ({source} statistics), "
          f"{config.num_images} images, seed {config.seed}, guidance {config.guidance:g}, {config.steps} steps, η = 0")

    errors = []
    for records in sample(schedule, {"fp": fp}, [Track("fp", "fp", Correction())], noise, labels, config.guidance):
        record = records["fp"]
        error = quantized(record.x_t, record.t, labels, config.guidance) - record.eps
        errors.append(f"t={record.t}: {float(error.pow(2).mean().sqrt()):.3f}")
    print("RMS of the quantized error in the guided ε along the FP trajectory:", ", ".join(errors))

    reference = final_samples(schedule, fp, noise, labels, config.guidance)
    print(describe("quantized network", final_samples(schedule, quantized, noise, labels, config.guidance), reference, model.kind))
    for sigma in (float(s) for s in args.sigmas.split(",")):
        for draw in range(args.draws):
            samples = final_samples(schedule, WithWhiteNoise(fp, sigma, draw), noise, labels, config.guidance)
            print(describe(f"white noise σ = {sigma:g}, draw {draw}", samples, reference, model.kind))


if __name__ == "__main__":
    main()
