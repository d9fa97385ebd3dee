"""Loading diffusion models and calling them as ε-predictors with classifier-free guidance.

`--model` takes one of the embedded names (shipped under assets/models/), a local folder
(our own format, a diffusers DDPM/DDIM pipeline folder with unet/ and scheduler/, or a bare
UNet2DModel folder), or a Hugging Face hub id of such a pipeline for users with a network.

Weights are read from safetensors only (pickle weights can run code when loaded). The apps load
`public=True`: the embedded models and those the operator lists in D2DPM_EXTRA_MODELS, nothing
else, refused with one message that does not depend on what exists on the server. A hub download
fetches only the model's configs and safetensors weights, after checking their size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODELS = ("emoji", "fashion", "toy2d")
MODEL_META_FILE = "d2dpm_model.json"
ALLOWED_MODELS = "emoji, fashion, toy2d, a local diffusers model folder, or a Hugging Face hub id (owner/name)"
EXTRA_MODELS_ENV = "D2DPM_EXTRA_MODELS"  # comma-separated folders or hub ids the apps may load besides the embedded ones
PUBLIC_ALLOWED = f"emoji, fashion, toy2d, or a model this server's operator lists in {EXTRA_MODELS_ENV}"
SAFETENSORS_ONLY = "weights saved as safetensors (pickle weights such as .bin, .pt or .ckpt are refused: they can run code when loaded)"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MAX_DOWNLOAD_MB = float(os.environ.get("D2DPM_MAX_DOWNLOAD_MB", "256"))  # a hub model's configs and weights together
MAX_LOADED_MODELS = int(os.environ.get("D2DPM_MAX_LOADED_MODELS", "4"))  # models kept in memory, least recently used dropped
HASH_CHUNK = 1 << 20

log = logging.getLogger(__name__)

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


# On the CPU a forward runs in chunks of at most this many samples: diffusers' Upsample2D copies a
# batch of 64 or more out of channels-last (and the convolution after it copies it back), and the
# smaller chunks stay in cache: a forward of 144 emoji samples on 2 threads took 10–15 % less time.
CPU_FORWARD_CHUNK = 48


class NoisePredictor:
    """ε_θ(x_t, t) of one network (full precision or quantized), guided when the model is conditional.

    Guidance (classifier-free): ε = ε(x, ∅) + g·(ε(x, c) − ε(x, ∅)), computed in one batched
    forward of [conditional; unconditional]. g = 1 needs the conditional half only.
    Stateless: one instance may serve several threads at once.

    `chunked=False` keeps every batch in one forward on the CPU too: for the calibration's
    `ActivationObserver`, which keeps a fixed number of values per forward and so must see one
    forward per step whatever the device.
    """

    def __init__(self, network: nn.Module, num_classes: int | None, chunked: bool = True):
        self.network = network
        self.num_classes = num_classes
        self.chunked = chunked

    def _forward(self, x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if not self.chunked or x.device.type != "cpu" or x.shape[0] <= CPU_FORWARD_CHUNK:
            return network_output(self.network, x, timesteps, labels)
        size = math.ceil(x.shape[0] / math.ceil(x.shape[0] / CPU_FORWARD_CHUNK))  # equal chunks: 72 → 36 + 36
        return torch.cat([network_output(self.network, x[i:i + size], timesteps[i:i + size],
                                         labels[i:i + size] if labels is not None else None)
                          for i in range(0, x.shape[0], size)])

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
    for path in sorted(weights_folder.rglob("*.safetensors")):  # the weights that are loaded, read in chunks
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    schedule = {key: value for key, value in scheduler_config.items() if not key.startswith("_")}  # not _diffusers_version
    digest.update(json.dumps(schedule, sort_keys=True).encode())
    return f"{name}@{digest.hexdigest()[:12]}"


def _check_safetensors(name: str, folder: Path) -> None:
    """Refuse a weights folder without safetensors weights, naming pickle files when those are all it has."""
    if (folder / WEIGHTS_FILE).is_file() or (folder / f"{WEIGHTS_FILE}.index.json").is_file():
        return
    if folder.is_dir() and any(path.suffix in PICKLE_SUFFIXES for path in folder.iterdir()):
        raise ConfigError("model", name, SAFETENSORS_ONLY + "; this model has only pickle weights")
    raise ConfigError("model", name, f"a model folder with its weights in {WEIGHTS_FILE}")


def _load_network(name: str, network_class: str, folder: Path) -> nn.Module:
    _check_safetensors(name, folder)
    try:
        if network_class == "UNet2DModel":
            from diffusers import UNet2DModel

            # Channels-last convolutions are ~10–20 % faster on CPU (oneDNN's native layout); inputs may stay NCHW.
            network = UNet2DModel.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
            network = network.to(memory_format=torch.channels_last)
        elif network_class == "ToyEpsMLP":
            from .toy import ToyEpsMLP

            network = ToyEpsMLP.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
        else:
            raise ConfigError("model", name, f"a UNet2DModel or ToyEpsMLP network (this model names {network_class!r})")
    except ConfigError:
        raise
    except Exception as error:  # broken config or weights: diffusers and safetensors raise many kinds
        log.warning("could not load the network of %r: %s", name, error)
        raise ConfigError("model", name, f"a loadable model: its network config or weights are broken ({type(error).__name__})") from None
    return network.float().eval().requires_grad_(False)


def _read_json(name: str, folder: Path, relative: str) -> dict:
    """A JSON object from `folder/relative`; the error names the file relative to the model, not the server's path."""
    try:
        value = json.loads((folder / relative).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ConfigError("model", name, f"a model whose {relative} is readable JSON ({type(error).__name__})") from None
    if not isinstance(value, dict):
        raise ConfigError("model", name, f"a model whose {relative} holds a JSON object")
    return value


def _positive_ints(value, lengths: tuple[int, ...]) -> bool:
    return (isinstance(value, list) and len(value) in lengths
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in value))


def _check_meta(name: str, meta: dict) -> None:
    """The fields of d2dpm_model.json that loading and sampling rely on."""
    def bad(field_name: str, allowed: str):
        raise ConfigError("model", name, f"a {MODEL_META_FILE} whose {field_name!r} is {allowed}")

    if meta.get("network_class") not in ("UNet2DModel", "ToyEpsMLP"):
        bad("network_class", "UNet2DModel or ToyEpsMLP")
    if meta.get("kind") not in ("image", "points"):
        bad("kind", "image or points")
    if not _positive_ints(meta.get("sample_shape"), (3,) if meta["kind"] == "image" else (1,)):
        bad("sample_shape", "a list of positive integers ([C, H, W] for images, [2] for points)")
    subfolder = meta.get("network_subfolder", "unet")
    if not isinstance(subfolder, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", subfolder):
        bad("network_subfolder", "the name of a subfolder of the model")
    classes = meta.get("num_classes")
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= 100_000):
        bad("num_classes", "a positive integer or null")
    names = meta.get("class_names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        bad("class_names", "a list of strings")


def _load_folder(name: str, folder: Path) -> DiffusionModel:
    if (folder / MODEL_META_FILE).is_file():  # our own format: embedded models and `d2dpm train` outputs
        meta = _read_json(name, folder, MODEL_META_FILE)
        _check_meta(name, meta)
        subfolder = meta.get("network_subfolder", "unet")
        scheduler_config = _read_json(name, folder, "scheduler/scheduler_config.json")
        network = _load_network(name, meta["network_class"], folder / subfolder)
        return DiffusionModel(
            name=name,
            network=network,
            scheduler_config=scheduler_config,
            kind=meta["kind"],
            sample_shape=tuple(meta["sample_shape"]),
            num_classes=meta.get("num_classes"),
            class_names=list(meta.get("class_names") or []),
            identity=_identity(str(meta.get("name", name)), folder / subfolder, scheduler_config),
            meta=meta,
        )
    if (folder / "unet" / "config.json").is_file():  # a DDPMPipeline / DDIMPipeline folder
        prefix = "unet/"
        scheduler_file = "scheduler/scheduler_config.json"
    elif (folder / "config.json").is_file():  # a bare UNet2DModel folder
        prefix = ""
        scheduler_file = "scheduler_config.json"
    else:
        raise ConfigError("model", name, ALLOWED_MODELS + "; this folder holds no diffusers model (no config.json, unet/config.json or d2dpm_model.json)")
    unet_folder = folder / prefix if prefix else folder
    unet_config = _read_json(name, folder, prefix + "config.json")
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError("model", name, f"an unconditional UNet2DModel (this folder holds a {str(unet_config.get('_class_name'))[:80]})")
    if unet_config.get("num_class_embeds") or unet_config.get("class_embed_type"):
        raise ConfigError("model", name, "an unconditional UNet2DModel, or a class-conditional one saved by `d2dpm train`")
    size = unet_config.get("sample_size", 32)
    channels = unet_config.get("in_channels", 3)
    if not (_positive_ints([size], (1,)) or _positive_ints(size, (2,))) or not _positive_ints([channels], (1,)):
        raise ConfigError("model", name, f"a UNet2DModel whose {prefix}config.json has a positive sample_size and in_channels")
    scheduler_config = _read_json(name, folder, scheduler_file) if (folder / scheduler_file).is_file() else dict(DEFAULT_SCHEDULER_CONFIG)
    network = _load_network(name, "UNet2DModel", unet_folder)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return DiffusionModel(
        name=name,
        network=network,
        scheduler_config=scheduler_config,
        kind="image",
        sample_shape=(int(channels), int(height), int(width)),
        identity=_identity(name, unet_folder, scheduler_config),
    )


def _hub_files(repo_id: str, sizes: dict[str, int | None], fetch) -> list[str]:
    """The files of a hub model that loading reads: configs and safetensors weights, no pickles."""
    if MODEL_META_FILE in sizes:
        meta_path = fetch(MODEL_META_FILE)
        meta = _read_json(repo_id, meta_path.parent, MODEL_META_FILE)
        _check_meta(repo_id, meta)
        prefix = meta.get("network_subfolder", "unet") + "/"
        wanted = [MODEL_META_FILE, "scheduler/scheduler_config.json", prefix + "config.json"]
    elif "unet/config.json" in sizes:
        prefix = "unet/"
        wanted = ["unet/config.json", "scheduler/scheduler_config.json", "model_index.json"]
    elif "config.json" in sizes:
        prefix = ""
        wanted = ["config.json", "scheduler_config.json"]
    else:
        raise ConfigError("model", repo_id, ALLOWED_MODELS + "; this hub repository holds no diffusers model")
    if prefix + WEIGHTS_FILE not in sizes:
        raise ConfigError("model", repo_id, SAFETENSORS_ONLY + f"; this hub model has no {prefix}{WEIGHTS_FILE}")
    return [name for name in wanted if name in sizes] + [prefix + WEIGHTS_FILE]


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a hub model's configs and safetensors weights (nothing else), after checking their total size."""
    from huggingface_hub import HfApi, hf_hub_download

    def unreachable(error: Exception):
        return ConfigError("model", repo_id, ALLOWED_MODELS + f"; the hub id could not be fetched ({type(error).__name__})")

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception as error:  # offline, unknown repo, gated: all are "cannot use this id"
        raise unreachable(error) from None
    sizes = {sibling.rfilename: sibling.size for sibling in (info.siblings or [])}
    revision = info.sha

    def fetch(filename: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except Exception as error:
            raise unreachable(error) from None

    limit = MAX_DOWNLOAD_MB * 1e6
    oversized = [name for name in sizes if name == MODEL_META_FILE and (sizes[name] is None or sizes[name] > 1e6)]
    if oversized:
        raise ConfigError("model", repo_id, f"a hub model whose {MODEL_META_FILE} is under 1 MB")
    files = _hub_files(repo_id, sizes, fetch)
    unknown = [name for name in files if sizes.get(name) is None]
    total = sum(sizes.get(name) or 0 for name in files)
    if unknown or total > limit:
        raise ConfigError("model", repo_id, f"a hub model whose configs and weights total at most {MAX_DOWNLOAD_MB:g} MB "
                          f"(D2DPM_MAX_DOWNLOAD_MB); this one: {total / 1e6:.0f} MB" + (", sizes unknown" if unknown else ""))
    root = None
    for name in files:
        path = fetch(name)
        root = path.parents[len(Path(name).parts) - 1]  # the snapshot folder
    return root


def _normalized(spec: str) -> str:
    """A spec as the allow-list compares it: hub ids as typed, paths made absolute (no filesystem access)."""
    if HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return spec
    return os.path.normpath(os.path.abspath(os.path.expanduser(spec)))


def extra_models() -> list[str]:
    """The models the operator allows in the apps besides the embedded ones: those listed in
    D2DPM_EXTRA_MODELS, and the apps' default model D2DPM_APP_MODEL (an operator's choice too)."""
    listed = [part.strip() for part in os.environ.get(EXTRA_MODELS_ENV, "").split(",")]
    default = os.environ.get("D2DPM_APP_MODEL", "").strip()
    return list(dict.fromkeys(spec for spec in [*listed, default] if spec and spec not in EMBEDDED_MODELS))


def check_public(spec) -> str:
    """The model spec if the apps may load it (embedded, or listed by the operator), else ConfigError.
    The refusal reads the same whether or not `spec` names something on the server: nothing is looked up."""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 4096 or "\x00" in spec:
        raise ConfigError("model", spec if isinstance(spec, str) else str(spec), PUBLIC_ALLOWED)
    spec = spec.strip()
    if spec in EMBEDDED_MODELS:
        return spec
    wanted = _normalized(spec)
    for allowed in extra_models():
        if allowed == spec or _normalized(allowed) == wanted:
            return allowed
    raise ConfigError("model", spec, PUBLIC_ALLOWED)


def resolve_model_folder(spec: str) -> Path:
    """The folder a model spec names; downloads a hub id (only when online)."""
    if not isinstance(spec, str) or not spec.strip() or "\x00" in spec:
        raise ConfigError("model", spec, ALLOWED_MODELS)
    spec = spec.strip()
    if spec in EMBEDDED_MODELS:
        folder = ASSETS_DIR / "models" / spec
        if not folder.is_dir():
            raise ConfigError("model", spec, ALLOWED_MODELS + f"; the embedded model {spec!r} is missing from assets/models")
        return folder
    path = Path(os.path.expanduser(spec))
    try:
        if path.is_dir():
            return path
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for the filesystem, and the like
        raise ConfigError("model", spec, ALLOWED_MODELS + "; no such folder") from None
    if HUB_ID.match(spec) and not spec.startswith((".", "~")) and not exists:
        return _download_from_hub(spec)
    raise ConfigError("model", spec, ALLOWED_MODELS + ("; this path is a file, not a folder" if exists else "; no such folder"))


_cache_lock = threading.Lock()
_loaded: "OrderedDict[str, DiffusionModel]" = OrderedDict()


def load_model(spec: str, public: bool = False) -> DiffusionModel:
    """Load (once per process, the MAX_LOADED_MODELS most recently used kept) the model a `--model`
    value names. `public=True` (the apps) loads only what `check_public` allows."""
    if public:
        spec = check_public(spec)
    folder = resolve_model_folder(spec)
    key = str(folder.resolve())
    with _cache_lock:
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
        model = _load_folder(spec.strip(), folder)
        _loaded[key] = model
        while len(_loaded) > MAX_LOADED_MODELS:
            _loaded.popitem(last=False)
        return model
