"""The shipped Emoji-32 file and the Fashion-MNIST reader (skipped without the Debian package)."""

from pathlib import Path

import pytest
import torch

from d2dpm.tools.datasets import FASHION_CLASSES, FASHION_DIR, load_emoji32, load_fashion_mnist


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
