"""The shipped Emoji-32 file, the Fashion-MNIST reader (skipped without the Debian package) and the toy mixture."""

import math
from pathlib import Path

import pytest
import torch

from d2dpm.datasets import (
    FASHION_CLASSES,
    FASHION_DIR,
    TOY_RING_MODES,
    TOY_RING_RADIUS,
    TOY_SCALE,
    load_emoji32,
    load_fashion_mnist,
    sample_toy2d,
    toy2d_log_density,
)


def test_emoji32_shapes_range_and_labels():
    images, labels, class_names = load_emoji32()
    assert images.shape == (3655, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert labels.dtype == torch.int64 and labels.shape == (3655,)
    assert len(class_names) == 9 and "Component" not in class_names
    assert set(labels.tolist()) == set(range(9))
    # White background: the corners of every emoji are (nearly) white.
    assert images[:, :, 0, 0].mean() > 0.9


def test_fashion_missing_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", directory=tmp_path)


@pytest.mark.skipif(not (Path(FASHION_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_test_split_padded_to_32():
    images, labels, class_names = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 32, 32)
    assert class_names == list(FASHION_CLASSES)
    assert torch.all(images[:, :, :2, :] == -1.0)  # the padding is background
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_toy2d_follows_its_construction():
    points, components = sample_toy2d(40000, torch.Generator().manual_seed(0), return_components=True)
    assert points.shape == (40000, 2)
    assert abs(points.mean(0)).max() < 0.03 and abs(points.var(0).mean() - 1.0) < 0.03
    ring = components < TOY_RING_MODES
    assert abs(ring.float().mean() - 0.5) < 0.01
    assert abs(points[ring].norm(dim=1).mean() - TOY_RING_RADIUS * TOY_SCALE) < 0.02
    # The 8 ring modes sit at multiples of 45°.
    angles = torch.atan2(points[ring, 1], points[ring, 0])
    offset = torch.remainder(angles + math.pi / 8, math.pi / 4) - math.pi / 8
    assert offset.abs().mean() < 0.1


def test_toy2d_density_integrates_to_one_and_is_seeded():
    grid = torch.linspace(-4, 4, 401)
    xs, ys = torch.meshgrid(grid, grid, indexing="ij")
    density = toy2d_log_density(torch.stack([xs.flatten(), ys.flatten()], 1)).exp()
    assert abs(density.sum().item() * (grid[1] - grid[0]).item() ** 2 - 1.0) < 1e-3
    first = sample_toy2d(10, torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_toy2d(10, torch.Generator().manual_seed(3)))
