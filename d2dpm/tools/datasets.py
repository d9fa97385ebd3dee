"""The image data the embedded models were trained on: Emoji-32 and Fashion-MNIST (the toy 2-D
mixture, whose density the core draws, is in `d2dpm.toy`).

Images come back as float32 NCHW tensors in [-1, 1], the range the models see.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..models import ASSETS_DIR

DATA_DIR = ASSETS_DIR / "data"
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
