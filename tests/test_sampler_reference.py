"""The sampler against diffusers' own DDIMScheduler, on a tiny random UNet2DModel."""

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import SCHEDULER_CONFIG, tiny_unet
from d2dpm.corrections import Correction
from d2dpm.models import NoisePredictor
from d2dpm.sampler import SamplerNoise, Track, sample
from d2dpm.schedule import DDIMSchedule


def reference_loop(unet, config, steps, eta, noise: SamplerNoise) -> torch.Tensor:
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    x = noise.initial
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise.variance[i] if eta > 0 else None).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_fp_sampler_reproduces_diffusers_ddim(eta, spacing):
    unet = tiny_unet()
    config = dict(SCHEDULER_CONFIG, timestep_spacing=spacing)
    steps = 10
    noise = SamplerNoise.draw(3, (3, 8, 8), steps, seed=1)
    schedule = DDIMSchedule(config, steps, eta)
    records = list(sample(schedule, {"fp": NoisePredictor(unet, None)}, [Track("fp", "fp", Correction())], noise))
    ours = records[-1]["fp"].x_prev
    reference = reference_loop(unet, config, steps, eta, noise)
    assert len(records) == steps
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_schedule_coefficients_match_diffusers_variance():
    eta = 0.7
    schedule = DDIMSchedule(SCHEDULER_CONFIG, 25, eta)
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(25)
    for coeff, t in zip(schedule, scheduler.timesteps):
        assert coeff.t == int(t)
        expected_sigma = eta * float(scheduler._get_variance(int(t), int(t) - 1000 // 25)) ** 0.5
        assert coeff.sigma == pytest.approx(expected_sigma, rel=1e-5, abs=1e-9)
        # k_t: the derivative of x_prev with respect to E in the step (finite difference on a scalar)
        x = torch.tensor([0.3], dtype=torch.float64)
        e = torch.tensor([0.2], dtype=torch.float64)
        plus, _ = schedule.step(x, e + 1e-3, coeff, coeff.sigma, None)
        minus, _ = schedule.step(x, e - 1e-3, coeff, coeff.sigma, None)
        assert float((plus - minus) / 2e-3) == pytest.approx(coeff.k, rel=1e-6, abs=1e-9)


def test_clip_sample_step_matches_diffusers():
    config = dict(SCHEDULER_CONFIG, clip_sample=True)
    schedule = DDIMSchedule(config, 10, 1.0)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator) * 3
    eps = torch.randn(2, 3, 8, 8, generator=generator)
    z = torch.randn(2, 3, 8, 8, generator=generator)
    for coeff, t in zip(schedule, scheduler.timesteps):
        ours, _ = schedule.step(x, eps, coeff, coeff.sigma, z)
        reference = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_guidance_combines_conditional_and_unconditional_outputs():
    unet = tiny_unet(num_class_embeds=4)
    predictor = NoisePredictor(unet, num_classes=3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    timesteps = torch.full((2,), 500)
    with torch.no_grad():
        cond = unet(x, timesteps, class_labels=labels).sample
        uncond = unet(x, timesteps, class_labels=torch.full((2,), 3)).sample
    guided = predictor(x, 500, labels, guidance=3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert torch.allclose(predictor(x, 500, labels, guidance=1.0), cond, atol=1e-6)
    assert torch.allclose(predictor(x, 500, labels, guidance=0.0), uncond, atol=1e-6)


def test_a_scheduler_with_thresholding_is_refused():
    from d2dpm.errors import ConfigError
    from d2dpm.schedule import DDIMSchedule

    with pytest.raises(ConfigError, match="thresholding"):
        DDIMSchedule({**SCHEDULER_CONFIG, "thresholding": True}, 10, 0.0)
