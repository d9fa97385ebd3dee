"""The data the embedded models were trained on: Emoji-32, Fashion-MNIST and a 2-D toy mixture.

Images come back as float32 NCHW tensors in [-1, 1], the range the models see.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
EMOJI32_FILE = DATA_DIR / "emoji32.npz"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_DIR_ENV = "D2DPM_FASHION_DIR"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class ImageDataset(NamedTuple):
    images: torch.Tensor  # float32 [N, C, 32, 32] in [-1, 1]
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]


def _to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).float().div(127.5).sub(1.0)


def load_emoji32(path: str | os.PathLike | None = None) -> ImageDataset:
    """Emoji-32 (3655 emoji, 9 Unicode groups) from the npz shipped in assets/data."""
    with np.load(path or EMOJI32_FILE) as data:
        images = _to_unit_range(data["images"]).permute(0, 3, 1, 2).contiguous()
        return ImageDataset(images, torch.from_numpy(data["labels"]), [str(name) for name in data["class_names"]])


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format): big-endian magic, dimensions, then unsigned bytes."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path.name} is not an idx file of the expected kind (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", directory: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST (60k train / 10k test), padded 28→32 with background, 1 channel.

    The idx .gz files are read from `directory`, else $D2DPM_FASHION_DIR, else where Debian's
    package dataset-fashion-mnist puts them.
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = Path(directory or os.environ.get(FASHION_DIR_ENV) or FASHION_DIR)
    images_path = folder / f"{prefixes[split]}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {folder}: install the Debian package dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist), or point {FASHION_DIR_ENV} at a folder with "
            f"{images_path.name} and {labels_path.name}"
        )
    images = np.pad(_read_idx(images_path, 0x803), ((0, 0), (2, 2), (2, 2)))  # 0 is the black background
    labels = _read_idx(labels_path, 0x801).astype(np.int64)
    return ImageDataset(_to_unit_range(images)[:, None], torch.from_numpy(labels), list(FASHION_CLASSES))


# The toy 2-D distribution: a Gaussian mixture, so its density is exact. Half the mass is a ring
# of 8 round Gaussians; the other half is a spiral drawn as a chain of small overlapping Gaussians
# (spaced by arc length, 1.75 std apart, so it reads as a continuous band). The whole mixture is
# then centred and scaled to unit variance per coordinate.
TOY_RING_MODES = 8
TOY_RING_RADIUS = 2.0
TOY_RING_STD = 0.12
TOY_SPIRAL_COMPONENTS = 64
TOY_SPIRAL_RADII = (0.3, 1.5)  # Archimedean, inner to outer radius over 1.5 turns
TOY_SPIRAL_TURNS = 1.5
TOY_SPIRAL_STD = 0.08


def _toy_mixture_unscaled() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ring_angles = 2 * math.pi * np.arange(TOY_RING_MODES) / TOY_RING_MODES
    ring = TOY_RING_RADIUS * np.stack([np.cos(ring_angles), np.sin(ring_angles)], 1)
    # Place the spiral's components at equal arc-length steps along r(θ) = r0 + (r1 − r0) θ / θ_max.
    theta_max = 2 * math.pi * TOY_SPIRAL_TURNS
    fine = np.linspace(0.0, theta_max, 20001)
    radius = TOY_SPIRAL_RADII[0] + (TOY_SPIRAL_RADII[1] - TOY_SPIRAL_RADII[0]) * fine / theta_max
    points = np.stack([radius * np.cos(fine), radius * np.sin(fine)], 1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    theta = np.interp(np.linspace(0.0, arc[-1], TOY_SPIRAL_COMPONENTS), arc, fine)
    spiral_radius = np.interp(theta, fine, radius)
    spiral = np.stack([spiral_radius * np.cos(theta), spiral_radius * np.sin(theta)], 1)
    means = np.concatenate([ring, spiral])
    stds = np.concatenate([np.full(TOY_RING_MODES, TOY_RING_STD), np.full(TOY_SPIRAL_COMPONENTS, TOY_SPIRAL_STD)])
    weights = np.concatenate([np.full(TOY_RING_MODES, 0.5 / TOY_RING_MODES), np.full(TOY_SPIRAL_COMPONENTS, 0.5 / TOY_SPIRAL_COMPONENTS)])
    return means, stds, weights


def _toy_mixture() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    means, stds, weights = _toy_mixture_unscaled()
    center = weights @ means
    # Per-coordinate variance of the mixture, averaged over x and y: E|x − c|² / 2.
    variance = (weights * (np.sum((means - center) ** 2, axis=1) + 2 * stds**2)).sum() / 2
    scale = 1.0 / math.sqrt(variance)
    return (
        torch.tensor((means - center) * scale, dtype=torch.float32),
        torch.tensor(stds * scale, dtype=torch.float32),
        torch.tensor(weights, dtype=torch.float32),
        scale,
    )


TOY_MEANS, TOY_STDS, TOY_WEIGHTS, TOY_SCALE = _toy_mixture()
TOY_RING_SLICE = slice(0, TOY_RING_MODES)  # rows of TOY_MEANS/TOY_STDS that are ring modes


def sample_toy2d(n: int, generator: torch.Generator | None = None, return_components: bool = False):
    """n points [n, 2] from the toy mixture; with return_components, also each point's component index."""
    components = torch.multinomial(TOY_WEIGHTS, n, replacement=True, generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    points = TOY_MEANS[components] + TOY_STDS[components, None] * noise
    return (points, components) if return_components else points


def toy2d_log_density(points: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) [N] of the toy mixture at points [N, 2] (isotropic Gaussian components)."""
    points = points.float()
    squared = ((points[:, None, :] - TOY_MEANS[None]) ** 2).sum(-1)
    log_normal = -squared / (2 * TOY_STDS**2) - torch.log(2 * math.pi * TOY_STDS**2)
    return torch.logsumexp(torch.log(TOY_WEIGHTS) + log_normal, dim=1)
