"""Tiny randomly initialised models saved to temporary folders: no download, seconds on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0, size: int = 8) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def save_conditional_model(folder: Path, num_classes: int = 3, seed: int = 0) -> Path:
    """A class-conditional model in d2dpm's own folder format (as `d2dpm train` writes it)."""
    unet = tiny_unet(num_class_embeds=num_classes + 1, seed=seed)
    unet.save_pretrained(folder / "unet")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    meta = {
        "name": "tiny-conditional",
        "kind": "image",
        "network_class": "UNet2DModel",
        "network_subfolder": "unet",
        "sample_shape": [3, 8, 8],
        "num_classes": num_classes,
        "class_names": [f"class {i}" for i in range(num_classes)],
        "null_class": num_classes,
    }
    (folder / "d2dpm_model.json").write_text(json.dumps(meta))
    return folder


def save_pipeline_folder(folder: Path, seed: int = 0) -> Path:
    """An unconditional DDPMPipeline-style folder: unet/ and scheduler/."""
    tiny_unet(seed=seed).save_pretrained(folder / "unet")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder


@pytest.fixture(scope="session")
def conditional_model_dir(tmp_path_factory) -> Path:
    return save_conditional_model(tmp_path_factory.mktemp("tiny_conditional"))


@pytest.fixture(scope="session")
def pipeline_model_dir(tmp_path_factory) -> Path:
    return save_pipeline_folder(tmp_path_factory.mktemp("tiny_pipeline"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own statistics cache and no network."""
    monkeypatch.setenv("D2DPM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
