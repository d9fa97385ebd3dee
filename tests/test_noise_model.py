"""The per-step noise model recovers known statistics; statistics files refuse misuse."""

import math

import pytest
import torch

from conftest import SCHEDULER_CONFIG
from d2dpm.errors import ConfigError
from d2dpm.models import NoisePredictor
from d2dpm.noise_model import RHO_LIMIT, NoiseStatistics, PairAccumulator, StatsConfig, fit_joint_gaussian
from d2dpm.quant import Quantizer
from d2dpm.schedule import DDIMSchedule
from synthetic import GaussianDataEps, NoisyCopy


def bivariate_normal(mu_x, mu_y, sd_x, sd_y, rho, count, generator):
    a = torch.randn(count, generator=generator, dtype=torch.float64)
    b = torch.randn(count, generator=generator, dtype=torch.float64)
    x = mu_x + sd_x * a
    y = mu_y + sd_y * (rho * a + math.sqrt(1 - rho**2) * b)
    return x, y


def test_fit_recovers_known_moments_per_group():
    generator = torch.Generator().manual_seed(0)
    truth = [(0.1, -0.2, 1.0, 0.3, 0.8), (-0.5, 0.05, 0.7, 0.1, -0.4), (0.0, 0.0, 1.2, 0.5, 0.0)]
    pairs = [bivariate_normal(*params, 200_000, generator) for params in truth]
    fit = fit_joint_gaussian(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
    for i, (mu_x, mu_y, sd_x, sd_y, rho) in enumerate(truth):
        # Tolerance: 5 standard errors of each estimator at n = 200k.
        assert float(fit["mu_x"][i]) == pytest.approx(mu_x, abs=5 * sd_x / 447)
        assert float(fit["mu_y"][i]) == pytest.approx(mu_y, abs=5 * sd_y / 447)
        assert math.sqrt(fit["var_x"][i]) == pytest.approx(sd_x, rel=0.01)
        assert math.sqrt(fit["var_y"][i]) == pytest.approx(sd_y, rel=0.01)
        fitted_rho = float(fit["cov"][i] / (fit["var_x"][i] * fit["var_y"][i]).sqrt())
        assert fitted_rho == pytest.approx(rho, abs=0.01)


def test_outliers_beyond_four_sigma_are_dropped():
    generator = torch.Generator().manual_seed(1)
    x, y = bivariate_normal(0.0, 0.2, 1.0, 0.1, 0.5, 100_000, generator)
    y[:200] = 50.0  # 0.2 % gross outliers, 500 σ away
    fit = fit_joint_gaussian(x, y)
    assert float(fit["mu_y"]) == pytest.approx(0.2, abs=0.003)
    assert math.sqrt(fit["var_y"]) == pytest.approx(0.1, rel=0.02)
    assert int(fit["n"]) <= 100_000 - 200
    naive = y.std()
    assert naive > 2.0  # without rejection the outliers would dominate


def calibrate_synthetic(quantized: NoisyCopy, steps=10, eta=1.0, samples=64, seed=0):
    """FP-driven trajectories of the Gaussian-data model; pairs from the synthetic quantized copy."""
    schedule = DDIMSchedule(SCHEDULER_CONFIG, steps, eta)
    fp = NoisePredictor(quantized.fp, None)
    q = NoisePredictor(quantized, None)
    pairs = PairAccumulator(steps, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, 8, 8, generator=generator)
    for coeff in schedule:
        eps = fp(x, coeff.t)
        pairs.add(coeff.index, q(x, coeff.t), eps)
        x, _ = schedule.step(x, eps, coeff, coeff.sigma, torch.randn(x.shape, generator=generator))
    config = StatsConfig("synthetic", 4, 8, steps, eta, 1.0, samples, seed)
    return schedule, pairs.fit(config, [c.t for c in schedule], Quantizer("rtn", {}))  # a synthetic "network": no layers


def test_statistics_recover_injected_noise_per_step_and_channel():
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1, -0.05, 0.0], std=[0.2, 0.05, 0.1])
    schedule, stats = calibrate_synthetic(quantized)
    # n = 64 samples × 64 pixels per channel: std error of a std ≈ 0.9 %, of a mean ≈ σ/64.
    for coeff in schedule:
        bias, std = quantized.expected(coeff.t)
        i = coeff.index
        fitted_std = stats.channel["var_y"][i].sqrt()
        assert torch.allclose(stats.channel["mu_y"][i].float(), bias, atol=float(4 * std.max() / 64)), f"step {i}"
        assert torch.allclose(fitted_std.float(), std, rtol=0.05), f"step {i}"
        # Δ is independent of ε, so Cov(ε̂, Δ) = Cov(ε + Δ, Δ) = σ_Δ²; the sample covariance of ε
        # and n adds an error of about σ_ε̂·σ_Δ/sqrt(n): allow 4 of those.
        n = stats.channel["n"][i]
        tolerance = 4 * (stats.channel["var_x"][i] * stats.channel["var_y"][i]).sqrt() / n.sqrt()
        assert ((stats.channel["cov"][i] - std.double() ** 2).abs() <= tolerance).all(), f"step {i}"
        # Tensor-wise: the pooled mean is the mean of the channel means (equal counts).
        assert float(stats.tensor["mu_y"][i]) == pytest.approx(float(bias.mean()), abs=float(4 * std.max() / 64))
    assert stats.rho().abs().max() <= RHO_LIMIT


def test_ptqd_statistics_recover_a_known_slope():
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.0, 0.0, 0.0], std=[0.02, 0.02, 0.02], slope=0.25)
    _, stats = calibrate_synthetic(quantized, eta=0.0)
    # The least-squares slope of Δ on ε is the injected 0.25, within 4 standard errors
    # σ_noise / (σ_ε sqrt(n)) (ε has little spread at the last steps, so the error grows there).
    sigma_eps = (stats.tensor["var_x"].sqrt() / 1.25)
    noise_std = 0.02 * 2 * torch.ones_like(sigma_eps)  # the injected std is at most doubled by the time profile
    tolerance = 4 * noise_std / (sigma_eps * stats.tensor["n"].sqrt())
    assert ((stats.ptqd_slope - 0.25).abs() <= tolerance).all()
    negative = NoisyCopy(GaussianDataEps(), bias=[0.0] * 3, std=[0.02] * 3, slope=-0.25)
    _, stats = calibrate_synthetic(negative, eta=0.0)
    assert float(stats.ptqd_slope.max()) == 0.0  # PTQD forbids negative correlation: clipped at 0


def test_conditional_mean_and_sigma_follow_the_gaussian_formulas():
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1, -0.05, 0.0], std=[0.2, 0.05, 0.1], slope=0.1)
    _, stats = calibrate_synthetic(quantized)
    eps_hat = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    step = 4
    fit = stats.channel
    for c in range(3):
        rho = fit["cov"][step, c] / (fit["var_x"][step, c] * fit["var_y"][step, c]).sqrt()
        expected = fit["mu_y"][step, c] + rho * (fit["var_y"][step, c] / fit["var_x"][step, c]).sqrt() * (eps_hat[:, c] - fit["mu_x"][step, c])
        assert torch.allclose(stats.conditional_mean(eps_hat, step)[:, c], expected.float(), atol=1e-6)
        expected_sigma = fit["var_y"][step, c].sqrt() * (1 - rho**2).sqrt()
        assert float(stats.sigma_cond()[step, c]) == pytest.approx(float(expected_sigma), rel=1e-9)


def test_table_has_one_row_per_step_and_the_schedule(tmp_path):
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1] * 3, std=[0.1] * 3)
    schedule, stats = calibrate_synthetic(quantized, steps=8)
    for granularity, sigma_prime in [("tensor", ["sigma_t_prime"]), ("channel", ["sigma_t_prime_c0", "sigma_t_prime_c1", "sigma_t_prime_c2"])]:
        table = stats.table(schedule, granularity)
        assert list(table["t"]) == [c.t for c in schedule]
        for column in ["alpha_bar", "sigma_t", "k_t", "mu_eps_hat", "mu_delta", "sigma_eps_hat", "sigma_delta", "rho", "sigma_cond",
                       *sigma_prime, "variance_absorbed", "ptqd_slope", "ptqd_bias", "ptqd_sigma_q"]:
            assert column in table and table[column].notna().all(), column
    assert len(stats.channel_table()) == 8 * 3


def test_save_load_round_trip_and_refusals(tmp_path):
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1] * 3, std=[0.1] * 3)
    _, stats = calibrate_synthetic(quantized, steps=5)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = NoiseStatistics.load(path, expected=stats.config)
    assert loaded.config == stats.config and loaded.timesteps == stats.timesteps
    for key in stats.channel:
        assert torch.equal(loaded.channel[key], stats.channel[key])

    other = StatsConfig(**{**stats.config.__dict__, "w_bits": 8})
    with pytest.raises(ConfigError) as refused:
        NoiseStatistics.load(path, expected=other)
    assert refused.value.argument == "stats" and "w_bits" in str(refused.value)

    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="unreadable"):
        NoiseStatistics.load(corrupted)
    with pytest.raises(ConfigError, match="existing statistics file"):
        NoiseStatistics.load(tmp_path / "missing.safetensors")
