"""The corrections on synthetic quantization noise with known statistics, and their exact rules."""

import math

import pytest
import torch

from conftest import SCHEDULER_CONFIG, tiny_unet
from d2dpm.calibration import calibrate
from d2dpm.corrections import Correction, DualDenoising, PTQDCorrection, absorb_variance, make_correction
from d2dpm.methods import DUAL, METHODS, ROW, Method, method_for_switches
from d2dpm.models import DiffusionModel, NoisePredictor
from d2dpm.noise_model import StatsConfig
from d2dpm.sampler import SamplerNoise, Track, sample
from d2dpm.schedule import DDIMSchedule, StepCoefficients
from synthetic import GaussianDataEps, NoisyCopy
from test_noise_model import calibrate_synthetic


def run_methods(schedule, fp_net, q_net, stats, methods, samples=64, seed=5):
    predictors = {"fp": NoisePredictor(fp_net, None), "q": NoisePredictor(q_net, None)}
    tracks = [Track(m, "fp" if m == "fp" else "q", make_correction(m, stats)) for m in methods]
    noise = SamplerNoise.draw(samples, (3, 8, 8), len(schedule), seed)
    records = list(sample(schedule, predictors, tracks, noise))
    return {m: records[-1][m].x_prev for m in methods}


def rms(tensor):
    return float(tensor.pow(2).mean().sqrt())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_corrections_bring_synthetic_quantized_samples_back_towards_fp(eta):
    # Δ = 0.3·ε + bias + small noise: a strongly correlated deviation, as in Figure 2 of the paper.
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1, -0.05, 0.0], std=[0.05, 0.05, 0.05], slope=0.3)
    schedule, stats = calibrate_synthetic(quantized, steps=10, eta=eta, samples=64)
    final = run_methods(schedule, quantized.fp, quantized, stats, ["fp", "q", "mean-only", "d-d2", "oracle"])
    distance = {m: rms(final[m] - final["fp"]) for m in final}
    assert distance["d-d2"] < 0.25 * distance["q"]
    assert distance["mean-only"] < 0.25 * distance["q"]
    # On this jointly Gaussian model the posterior-mean correction leaves no excess variance to
    # absorb (its residual is orthogonal to E', not to ε), so absorbing σ_cond² moves D-D² a
    # little *away* from mean-only at η = 1; the mean half carries the gain. docs/results.md.
    assert abs(distance["d-d2"] - distance["mean-only"]) < 0.1 * (distance["q"] - distance["mean-only"])
    assert distance["oracle"] < 1e-5  # ε̂ − (ε̂ − ε) is ε up to float rounding


def test_d2_deterministic_equals_mean_only_at_eta_zero(conditional_model_dir):
    from d2dpm.experiment import CompareConfig, Workbench

    workbench = Workbench()
    config = CompareConfig(model=str(conditional_model_dir), w_bits=4, a_bits=6, steps=6, eta=0.0, methods=("q", "d-d2", "mean-only"),
                           num_images=3, calib_samples=8, backbone="rtn")
    result = workbench.compare(config)
    assert torch.equal(result.samples["d-d2"], result.samples["mean-only"])
    assert not torch.equal(result.samples["d-d2"], result.samples["q"])  # the mean correction did act


def test_s_d2_at_eta_zero_is_random_across_seeds_and_repeatable_for_one():
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1] * 3, std=[0.1] * 3, slope=0.2)
    schedule, stats = calibrate_synthetic(quantized, steps=6, eta=0.0)
    first = run_methods(schedule, quantized.fp, quantized, stats, ["s-d2"], samples=4, seed=1)["s-d2"]
    again = run_methods(schedule, quantized.fp, quantized, stats, ["s-d2"], samples=4, seed=1)["s-d2"]
    other = run_methods(schedule, quantized.fp, quantized, stats, ["s-d2"], samples=4, seed=2)["s-d2"]
    assert torch.equal(first, again)
    # Another seed changes x_T too; isolate z' by keeping x_T and the z's and redrawing z' only.
    noise = SamplerNoise.draw(4, (3, 8, 8), 6, 1)
    redrawn = SamplerNoise(noise.initial, noise.variance, [torch.randn_like(z) for z in noise.extra])
    predictors = {"fp": NoisePredictor(quantized.fp, None), "q": NoisePredictor(quantized, None)}
    track = [Track("s-d2", "q", make_correction("s-d2", stats))]
    with_new_extra = list(sample(schedule, predictors, track, redrawn))[-1]["s-d2"].x_prev
    assert not torch.allclose(first, with_new_extra)
    assert not torch.allclose(first, other)


def coeff(sigma, k, index=0, t=500):
    return StepCoefficients(index=index, t=t, t_prev=t - 100, alpha_bar=0.5, alpha_bar_prev=0.6, sigma=sigma, k=k)


def test_sigma_prime_follows_the_clamp_rule():
    like = torch.zeros(1, 2, 1, 1)
    # k²σ² < σ_t²: σ_t' = sqrt(σ_t² − k²σ²)
    assert absorb_variance(coeff(0.5, -2.0), 0.1, like) == pytest.approx(math.sqrt(0.25 - 0.04))
    # k²σ² ≥ σ_t²: clamped to 0
    assert absorb_variance(coeff(0.5, -2.0), 0.3, like) == 0.0
    # σ_t = 0 (η = 0): nothing absorbed, σ stays exactly 0
    assert absorb_variance(coeff(0.0, -2.0), 0.1, like) == 0.0
    # per channel: one σ_t' per channel, shaped to broadcast over [N, C, H, W]
    per_channel = absorb_variance(coeff(0.5, -2.0), torch.tensor([0.1, 0.3]), like)
    assert per_channel.shape == (1, 2, 1, 1)
    assert per_channel.flatten().tolist() == pytest.approx([math.sqrt(0.21), 0.0])


def test_d2_and_ptqd_apply_their_formulas():
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1, -0.05, 0.0], std=[0.2, 0.05, 0.1], slope=0.1)
    schedule, stats = calibrate_synthetic(quantized, steps=5, eta=1.0)
    step = schedule.steps[2]
    eps_hat = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    z_extra = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mu = stats.conditional_mean(eps_hat, 2)
    sigma_cond = stats.sigma_cond()[2].float().view(1, 3, 1, 1)

    d = DualDenoising(stats, "deterministic")(eps_hat, step, z_extra)
    assert torch.allclose(d.eps, eps_hat - mu)
    expected_sigma = (step.sigma**2 - step.k**2 * sigma_cond**2).clamp_min(0).sqrt()
    assert torch.allclose(d.sigma, expected_sigma, atol=1e-6)

    s = DualDenoising(stats, "stochastic")(eps_hat, step, z_extra)
    assert torch.allclose(s.eps, eps_hat - mu - sigma_cond * z_extra, atol=1e-6)
    assert s.sigma == step.sigma

    var_only = DualDenoising(stats, "deterministic", mean=False)(eps_hat, step, z_extra)
    assert torch.equal(var_only.eps, eps_hat)  # mean off: ε̂ unchanged, unconditional σ_Δ absorbed
    sigma_delta = stats.channel["var_y"][2].sqrt().float().view(1, 3, 1, 1)
    assert torch.allclose(var_only.sigma, (step.sigma**2 - step.k**2 * sigma_delta**2).clamp_min(0).sqrt(), atol=1e-6)

    p = PTQDCorrection(stats)(eps_hat, step)
    gain = 1 + float(stats.ptqd_slope[2])
    assert torch.allclose(p.eps, (eps_hat - stats.ptqd_bias[2].float().view(1, 3, 1, 1)) / gain, atol=1e-6)
    residual = float(stats.ptqd_sigma[2]) / gain
    assert p.sigma == pytest.approx(math.sqrt(max(step.sigma**2 - step.k**2 * residual**2, 0.0)))


def test_ui_switches_name_the_methods():
    assert method_for_switches(True, True, "deterministic") == "d-d2"
    assert method_for_switches(True, True, "stochastic") == "s-d2"
    assert method_for_switches(True, False, "stochastic") == "mean-only"
    assert method_for_switches(True, False, "deterministic") == "mean-only"  # S and D coincide without the variance half
    assert method_for_switches(False, True, "deterministic") == "var-only"
    assert method_for_switches(False, True, "stochastic") == "s-var-only"
    assert method_for_switches(False, False, "deterministic") is None


def test_every_registry_entry_builds_its_correction_and_is_offered_by_the_uis():
    stats = calibrate_synthetic(NoisyCopy(GaussianDataEps(), bias=[0.1] * 3, std=[0.1] * 3, slope=0.2), steps=3)[1]
    for name, method in METHODS.items():
        correction = make_correction(name, stats, "tensor")
        assert type(correction) is Correction.kinds[method.correction] and method.network in ("fp", "q"), name
        if method.ui == DUAL:  # reachable through the switches, with the switches' own options
            options = method.kwargs
            assert method_for_switches(options["mean"], options["variance"], options["mode"]) == name
            assert (correction.mode, correction.mean, correction.variance, correction.granularity) == (
                options["mode"], options["mean"], options["variance"], "tensor")
        assert bool(method.ui_label) == (method.ui == ROW), name
    assert isinstance(make_correction("ptqd", stats), PTQDCorrection) and METHODS["fp"].network == "fp"
    with pytest.raises(ValueError, match="needs noise statistics"):
        make_correction("d-d2", None)


def test_a_new_correction_is_a_class_and_one_registry_entry(conditional_model_dir, tmp_path, monkeypatch):
    from d2dpm import figures
    from d2dpm.experiment import CompareConfig, Workbench

    class HalfTheDeviation(Correction):  # E' = ε̂ − (ε̂ − ε)/2: half the oracle's step
        needs_fp_eps = True

        def __call__(self, eps_hat, coeff, extra_noise=None, eps_fp=None):
            return super().__call__(eps_hat - (eps_hat - eps_fp) / 2, coeff)

    entry = Method("half", "Half oracle", "#123456", "q", "half the true Δ removed", correction="HalfTheDeviation", ui=ROW,
                   ui_label="Half-oracle row")
    monkeypatch.setitem(METHODS, "half", entry)
    config = CompareConfig(model=str(conditional_model_dir), steps=4, eta=1.0, methods=("q", "half", "oracle"), num_images=2,
                           calib_samples=4, backbone="rtn")
    result = Workbench(cache_dir=tmp_path).compare(config)
    errors = result.metrics.set_index("method")["mse_to_fp"]
    assert errors["oracle"] < errors["half"] < errors["q"]
    assert result.metrics.set_index("method").loc["half", "label"] == "Half oracle" and figures.method_color("half") == "#123456"


def test_quantized_network_calibration_reduces_error_with_d2(tmp_path):
    """On a real (tiny, random) UNet quantized at W4A6, the mean correction pulls the first
    step's noise estimate toward the FP one on the calibration trajectories' own states."""
    unet = tiny_unet()
    model = DiffusionModel("tiny", unet, dict(SCHEDULER_CONFIG), "image", (3, 8, 8), identity="tiny@0")
    config = StatsConfig("tiny@0", 4, 6, 5, 0.0, 1.0, 16, 0, backbone="rtn")
    calibrated = calibrate(model, config)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    step = DDIMSchedule(SCHEDULER_CONFIG, 5, 0.0).steps[0]
    eps = NoisePredictor(unet, None)(x, step.t)
    eps_hat = NoisePredictor(calibrated.quantized_network, None)(x, step.t)
    corrected = DualDenoising(calibrated.stats, "deterministic")(eps_hat, step).eps
    assert rms(corrected - eps) < rms(eps_hat - eps)


def test_mean_corrected_output_has_a_variance_deficit_of_sigma_cond_squared():
    # Why D-D²'s variance half cannot help on jointly Gaussian noise (docs/results.md): E' = ε̂ − μ_cond(ε̂)
    # is the posterior mean E[ε | ε̂], whose variance falls short of Var ε by σ_cond², per channel.
    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1, -0.05, 0.0], std=[0.2, 0.3, 0.4], slope=0.0)
    schedule, stats = calibrate_synthetic(quantized, steps=10, eta=1.0, samples=256, seed=1)
    coeff = schedule.steps[4]
    x = torch.randn(512, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.full((512,), coeff.t)
    with torch.no_grad():
        eps, eps_hat = quantized.fp(x, t), quantized(x, t)
    corrected = eps_hat - stats.conditional_mean(eps_hat, coeff.index)
    deficit = eps.var(dim=(0, 2, 3)) - corrected.var(dim=(0, 2, 3))
    sigma_cond = stats.sigma_cond("channel")[coeff.index].float()
    assert torch.allclose(deficit, sigma_cond**2, rtol=0.15, atol=2e-3), (deficit, sigma_cond**2)
    assert (deficit > 0).all()  # less variance than FP, never more: nothing for D-D² to absorb


@pytest.mark.parametrize("eta, mode", [(1.0, "deterministic"), (0.0, "stochastic"), (0.6, "stochastic")])
def test_algorithm_1_equals_the_samplers_d2_track(eta, mode):
    from d2dpm.corrections import sample_with_dual_denoising

    quantized = NoisyCopy(GaussianDataEps(), bias=[0.1, -0.05, 0.0], std=[0.2, 0.05, 0.1], slope=0.2)
    schedule, stats = calibrate_synthetic(quantized, steps=6, eta=eta)
    noise = SamplerNoise.draw(4, (3, 8, 8), 6, 5)
    method = "d-d2" if mode == "deterministic" else "s-d2"
    predictors = {"fp": NoisePredictor(quantized.fp, None), "q": NoisePredictor(quantized, None)}
    track = list(sample(schedule, predictors, [Track(method, "q", make_correction(method, stats))], noise))[-1][method].x_prev
    loop = sample_with_dual_denoising(lambda x, t: predictors["q"](x, t), schedule, stats, noise.initial, noise.variance, noise.extra, mode)
    assert torch.equal(loop, track)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_the_deviation_view_draws_the_sigma_prime_the_d_d2_track_applied(granularity):
    from d2dpm.figures import deviation_figure, sigma_prime_columns

    quantized = NoisyCopy(GaussianDataEps(), bias=[0.02, -0.05, 0.0], std=[0.3, 0.02, 0.1], slope=0.2)
    schedule, stats = calibrate_synthetic(quantized, steps=8, eta=1.0)
    noise = SamplerNoise.draw(2, (3, 8, 8), 8, 0)
    predictors = {"fp": NoisePredictor(quantized.fp, None), "q": NoisePredictor(quantized, None)}
    track = [Track("d-d2", "q", make_correction("d-d2", stats, granularity))]
    applied = [torch.as_tensor(records["d-d2"].sigma).flatten().double() for records in sample(schedule, predictors, track, noise)]
    figure = deviation_figure(stats.table(schedule, granularity))
    columns = sigma_prime_columns(stats.table(schedule, granularity))
    assert len(columns) == (3 if granularity == "channel" else 1)
    drawn = {trace.name: trace.y for trace in figure.data}
    for channel, (_, name, _) in enumerate(columns):
        plotted = torch.tensor(list(drawn[name]), dtype=torch.float64)
        expected = torch.stack([sigma.expand(len(columns))[channel] for sigma in applied])
        assert torch.allclose(plotted, expected, rtol=1e-6, atol=1e-9)
    # Channels differ here (σ_Δ of 0.3 vs 0.02): some step takes the variance in one channel and not another.
    if granularity == "channel":
        table = stats.table(schedule, granularity)
        per_channel = table[[c for c, _, _ in columns]].to_numpy()
        assert (per_channel.max(1) > per_channel.min(1)).any()
