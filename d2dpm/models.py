"""Loading diffusion models and calling them as ε-predictors with classifier-free guidance.

`--model` takes one of the embedded names (shipped under assets/models/), a local folder
(our own format, a diffusers DDPM/DDIM pipeline folder with unet/ and scheduler/, or a bare
UNet2DModel folder), or a Hugging Face hub id of such a pipeline for users with a network.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODELS = ("emoji", "fashion", "toy2d")
MODEL_META_FILE = "d2dpm_model.json"
ALLOWED_MODELS = "emoji, fashion, toy2d, a local diffusers model folder, or a Hugging Face hub id (owner/name)"

# DDPM (Ho et al.): 1000 steps, linear β from 1e-4 to 0.02, as google/ddpm-* use. Our training
# writes it beside every model; a bare UNet folder with no scheduler gets it too.
DEFAULT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


@dataclass
class DiffusionModel:
    """A loaded ε-network with what sampling it needs to know."""

    name: str  # what the user asked for
    network: nn.Module  # full precision, eval mode, float32
    scheduler_config: dict
    kind: str  # "image" or "points"
    sample_shape: tuple[int, ...]  # (C, H, W) or (2,)
    num_classes: int | None = None  # real classes; the null class for guidance is index num_classes
    class_names: list[str] = field(default_factory=list)
    identity: str = ""  # name plus a hash of the weights: part of every statistics key
    meta: dict = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def channels(self) -> int:
        return self.sample_shape[0] if self.kind == "image" else self.sample_shape[-1]


def network_output(network: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The raw ε output of a network on a batch (one timestep per sample; a class per sample, or None)."""
    out = network(x, timesteps, class_labels=labels) if labels is not None else network(x, timesteps)
    return out.sample if hasattr(out, "sample") else out


class NoisePredictor:
    """ε_θ(x_t, t) of one network (full precision or quantized), guided when the model is conditional.

    Guidance (classifier-free): ε = ε(x, ∅) + g·(ε(x, c) − ε(x, ∅)), computed in one batched
    forward of [conditional; unconditional]. g = 1 needs the conditional half only.
    Stateless: one instance may serve several threads at once.
    """

    def __init__(self, network: nn.Module, num_classes: int | None):
        self.network = network
        self.num_classes = num_classes

    def _forward(self, x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
        return network_output(self.network, x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), labels)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: int, labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        if self.num_classes is None:
            return self._forward(x, t, None)
        null = torch.full_like(labels, self.num_classes)
        if guidance == 1.0:
            return self._forward(x, t, labels)
        if guidance == 0.0:
            return self._forward(x, t, null)
        eps_cond, eps_uncond = self._forward(torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)


def _identity(name: str, weights_folder: Path, scheduler_config: dict) -> str:
    """name@hash of the weights and of the noise schedule: statistics are keyed by it, so new
    weights or an edited scheduler config never reuse statistics made for the old ones."""
    digest = hashlib.sha256()
    for path in sorted(weights_folder.rglob("*.safetensors")) + sorted(weights_folder.rglob("*.bin")):
        digest.update(path.read_bytes())
    schedule = {key: value for key, value in scheduler_config.items() if not key.startswith("_")}  # not _diffusers_version
    digest.update(json.dumps(schedule, sort_keys=True).encode())
    return f"{name}@{digest.hexdigest()[:12]}"


def _load_network(network_class: str, folder: Path) -> nn.Module:
    if network_class == "UNet2DModel":
        from diffusers import UNet2DModel

        # Channels-last convolutions are ~10–20 % faster on CPU (oneDNN's native layout); inputs may stay NCHW.
        network = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).to(memory_format=torch.channels_last)
    elif network_class == "ToyEpsMLP":
        from .toy import ToyEpsMLP

        network = ToyEpsMLP.from_pretrained(folder, low_cpu_mem_usage=False)
    else:
        raise ConfigError("model", f"a network of class {network_class}", "UNet2DModel or ToyEpsMLP networks")
    return network.float().eval().requires_grad_(False)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError("model", str(path), f"a readable JSON file ({error})") from None


def _load_folder(name: str, folder: Path) -> DiffusionModel:
    meta_path = folder / MODEL_META_FILE
    if meta_path.is_file():  # our own format: embedded models and `d2dpm train` outputs
        meta = _read_json(meta_path)
        network = _load_network(meta["network_class"], folder / meta.get("network_subfolder", "unet"))
        scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
        return DiffusionModel(
            name=name,
            network=network,
            scheduler_config=scheduler_config,
            kind=meta["kind"],
            sample_shape=tuple(meta["sample_shape"]),
            num_classes=meta.get("num_classes"),
            class_names=list(meta.get("class_names") or []),
            identity=_identity(meta.get("name", name), folder / meta.get("network_subfolder", "unet"), scheduler_config),
            meta=meta,
        )
    if (folder / "unet" / "config.json").is_file():  # a DDPMPipeline / DDIMPipeline folder
        unet_folder = folder / "unet"
        scheduler_path = folder / "scheduler" / "scheduler_config.json"
    elif (folder / "config.json").is_file():  # a bare UNet2DModel folder
        unet_folder = folder
        scheduler_path = folder / "scheduler_config.json"
    else:
        raise ConfigError("model", name, ALLOWED_MODELS + f"; the folder {folder.name!r} holds no diffusers model")
    unet_config = _read_json(unet_folder / "config.json")
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError("model", name, f"an unconditional UNet2DModel (this folder holds a {unet_config.get('_class_name')})")
    if unet_config.get("num_class_embeds") or unet_config.get("class_embed_type"):
        raise ConfigError("model", name, "an unconditional UNet2DModel, or a class-conditional one saved by `d2dpm train`")
    scheduler_config = _read_json(scheduler_path) if scheduler_path.is_file() else dict(DEFAULT_SCHEDULER_CONFIG)
    network = _load_network("UNet2DModel", unet_folder)
    size = unet_config.get("sample_size", 32)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return DiffusionModel(
        name=name,
        network=network,
        scheduler_config=scheduler_config,
        kind="image",
        sample_shape=(int(unet_config.get("in_channels", 3)), int(height), int(width)),
        identity=_identity(name, unet_folder, scheduler_config),
    )


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "unet/*", "scheduler/*", "*.safetensors"],
            )
        )
    except Exception as error:  # offline, unknown repo, gated: all are "cannot use this id"
        raise ConfigError(
            "model", repo_id, ALLOWED_MODELS + f"; the hub id could not be fetched ({type(error).__name__})"
        ) from None


def resolve_model_folder(spec: str) -> Path:
    """The folder a model spec names; downloads a hub id (only when online)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("model", spec, ALLOWED_MODELS)
    spec = spec.strip()
    if spec in EMBEDDED_MODELS:
        folder = ASSETS_DIR / "models" / spec
        if not folder.is_dir():
            raise ConfigError("model", spec, ALLOWED_MODELS + f"; the embedded model {spec!r} is missing from assets/models")
        return folder
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id:
        return _download_from_hub(spec)
    raise ConfigError("model", spec, ALLOWED_MODELS + "; no such folder")


_cache_lock = threading.Lock()
_loaded: dict[str, DiffusionModel] = {}


def load_model(spec: str) -> DiffusionModel:
    """Load (once per process) the model a `--model` value names."""
    folder = resolve_model_folder(spec)
    key = str(folder.resolve())
    with _cache_lock:
        if key not in _loaded:
            _loaded[key] = _load_folder(spec.strip(), folder)
        return _loaded[key]
