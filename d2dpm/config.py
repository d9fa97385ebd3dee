"""Every setting of a run, what it allows and its default, in one place (standard library only).

- `QuantConfig`: how the quantized network is made (bits, range search, edge layers, PTQ backbone).
- `StatsConfig`: everything that produced a set of noise statistics; its hash names the shipped and
  cached statistics files, so its fields and their JSON spelling never change without a format bump.
- `CompareConfig`: one comparison, a model, a quantization, a sampler (steps, η, guidance) and the
  methods to run side by side, with the defaults the CLI and both UIs start from.

Nothing here imports torch: the CLI builds its parsers from these defaults and checks the values that
do not depend on the model before any heavy import (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from .errors import ConfigError, check_float_range, check_int_range
from .methods import METHODS

if TYPE_CHECKING:  # only for annotations: loading a model imports torch
    from .models import DiffusionModel

# -- quantization

NOT_QUANTIZED_BITS = (16, 32)  # "16 or 32 bits" means the tensor stays in floating point
WEIGHT_BITS = (2, 8)
ACTIVATION_BITS = (4, 8)
EDGE_LAYER_BITS = 8  # first and last layer stay at 8 bits (Q-Diffusion, PTQD, D²-DPM)
FLOAT_BITS = NOT_QUANTIZED_BITS[-1]
RANGE_METHODS = ("mse", "minmax")
# How the quantized network is made (docs/quantization.md): round to nearest; that plus per-layer
# bias correction; learned rounding (AdaRound) with split concat inputs, plus bias correction.
BACKBONES = ("adaround", "bias-correction", "rtn")
# The library's and CLI's default: any configuration calibrates it in seconds on a CPU. The app shows
# the paper-like adaround, shipped for its default views (docs/quantization.md, "Cost").
DEFAULT_BACKBONE = "bias-correction"


@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 8
    a_bits: int = 8
    range_method: str = "mse"  # how activation and weight clipping ranges are chosen
    keep_edge_layers_8bit: bool = True
    backbone: str = DEFAULT_BACKBONE

    def __post_init__(self):
        object.__setattr__(self, "w_bits", check_int_range("w_bits", self.w_bits, *WEIGHT_BITS, extra=NOT_QUANTIZED_BITS))
        object.__setattr__(self, "a_bits", check_int_range("a_bits", self.a_bits, *ACTIVATION_BITS, extra=NOT_QUANTIZED_BITS))
        if self.range_method not in RANGE_METHODS:
            raise ConfigError("range_method", self.range_method, " or ".join(RANGE_METHODS))
        if self.backbone not in BACKBONES:
            raise ConfigError("backbone", self.backbone, ", ".join(BACKBONES))

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    def layer_bits(self, is_edge: bool, takes_network_input: bool = False) -> tuple[int, int]:
        """(weight bits, activation bits) of a layer. With `keep_edge_layers_8bit`, edge layers are
        raised to 8 bits (never lowered), and the layer fed the network's own input keeps that input in
        floating point: x_t is the sampler's state, not an activation (BRECQ-style backbones quantize
        what layers output, so the image enters unquantized), and a grid on it would clip a pixel that
        drifts past its range, so that ε̂ could never pull it back (docs/quantization.md)."""
        if not (is_edge and self.keep_edge_layers_8bit):
            return self.w_bits, self.a_bits

        def raise_to_edge(bits: int) -> int:
            return bits if bits in NOT_QUANTIZED_BITS else max(bits, EDGE_LAYER_BITS)

        return raise_to_edge(self.w_bits), FLOAT_BITS if takes_network_input else raise_to_edge(self.a_bits)


# -- the sampler and the noise model

ETA_RANGE = (0.0, 1.0)  # 0: deterministic DDIM, 1: DDPM-like
MAX_GUIDANCE = 20.0
GRANULARITIES = ("channel", "tensor")  # the noise model per channel, or one per tensor


def check_eta(eta) -> float:
    """DDIM's η as a float in [0, 1], else ConfigError: the one check of η."""
    return check_float_range("eta", eta, *ETA_RANGE)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ConfigError("granularity", granularity, " or ".join(GRANULARITIES))
    return granularity


# -- statistics

CALIB_SAMPLES_RANGE = (2, 4096)
MAX_CALIB_SEED = 2**32 - 1  # calibration derives per-batch seeds as seed · 1 000 003 + batch: stay within 64 bits
# 2: the quantizer (backbone, weight grids, AdaRound rounding, bias corrections) is saved in full, and
# calibration draws its trajectories through the sampler's noise (another order of random draws).
# 3: the network's own input stays in floating point (`QuantConfig.layer_bits`).
# 4: the backbones after `rtn` add a bias correction per calibrated step.
STATS_FORMAT_VERSION = 4


@dataclass(frozen=True)
class StatsConfig:
    """Everything that produced a set of statistics: loading them for anything else is refused."""

    model: str  # the model's identity: name and weights hash
    w_bits: int
    a_bits: int
    steps: int
    eta: float
    guidance: float
    calib_samples: int
    seed: int
    range_method: str = "mse"
    keep_edge_layers_8bit: bool = True
    backbone: str = DEFAULT_BACKBONE
    format_version: int = STATS_FORMAT_VERSION

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.w_bits, self.a_bits, self.range_method, self.keep_edge_layers_8bit, self.backbone)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def key(self) -> str:
        """A short stable hash of the configuration, for cache file names."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def differences(self, other: "StatsConfig") -> list[str]:
        return [f"{f.name}: file has {getattr(self, f.name)!r}, wanted {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# -- a comparison

DEFAULT_METHODS = ("fp", "q", "ptqd", "s-d2", "d-d2")
DEFAULT_CALIB_SAMPLES = 128
MAX_IMAGES = 64
MAX_POINTS = 4096  # a toy2d "image" is one 2-D point: a cloud of thousands costs less than one 32×32 image
DEFAULT_NUM_IMAGES = 8  # when one image per class is not the default (see default_num_images)
MAX_ONE_PER_CLASS = 16  # above this many classes, one image each is too many for a first look


def default_num_images(num_classes: int | None) -> int:
    """How many samples a comparison draws when none is asked for: one per class for a
    class-conditional model with up to MAX_ONE_PER_CLASS classes (images cycle through the classes,
    so every group shows once: 9 for emoji, 10 for Fashion-MNIST), else DEFAULT_NUM_IMAGES."""
    if num_classes and num_classes <= MAX_ONE_PER_CLASS:
        return num_classes
    return DEFAULT_NUM_IMAGES
MAX_SEED = 2**63 - 1


def parse_methods(methods) -> tuple[str, ...]:
    """Method names from a comma-separated string or a sequence; FP always comes first."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [m for m in names if m]
    for name in names:
        if name not in METHODS:
            raise ConfigError("methods", name, ", ".join(METHODS))
    return tuple(dict.fromkeys(["fp", *names]))


def _checked_methods(methods) -> tuple[str, ...]:
    """parse_methods, refusing an empty list: a comparison needs at least one method beside FP's reference."""
    names = methods.split(",") if isinstance(methods, str) else [str(m) for m in methods]
    if not any(name.strip() for name in names):
        raise ConfigError("methods", methods if isinstance(methods, str) else ",".join(names),
                          "one or more of " + ", ".join(METHODS) + " (comma-separated)")
    return parse_methods(methods)


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: a model, a quantization, a sampler, and the methods to run side by side.

    The fields are flat on purpose: they are the CLI's flags, the keys of run.json and, with the
    model's identity, the fields of the `StatsConfig` that names the statistics. `quant` gives the
    quantization they describe."""

    model: str = "emoji"
    w_bits: int = 4
    a_bits: int = 8
    steps: int = 20
    eta: float = 0.0
    guidance: float | None = None  # None: 3 for class-conditional models, 1 otherwise
    class_label: int | None = None  # None: images cycle through the classes
    methods: tuple[str, ...] = DEFAULT_METHODS
    seed: int = 0
    num_images: int | None = None  # None: default_num_images (one per class for a conditional model)
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_seed: int = 0
    granularity: str = "channel"
    range_method: str = "mse"
    keep_edge_layers_8bit: bool = True
    backbone: str = DEFAULT_BACKBONE  # how the quantized network is made: adaround, bias-correction or rtn
    stats_path: str | None = None  # an explicit statistics file (else shipped, cached or calibrated)

    @property
    def quant(self) -> QuantConfig:
        """The quantization these settings describe (ConfigError when a value is out of range)."""
        return QuantConfig(self.w_bits, self.a_bits, self.range_method, self.keep_edge_layers_8bit, self.backbone)

    @staticmethod
    def default_guidance(conditional: bool) -> float:
        return 3.0 if conditional else 1.0

    def checked(self) -> "CompareConfig":
        """Check every field that does not depend on the model (the CLI does, before loading anything);
        return the config with the values normalised."""
        quant = self.quant
        check_granularity(self.granularity)
        return dataclasses.replace(
            self,
            w_bits=quant.w_bits,
            a_bits=quant.a_bits,
            eta=check_eta(self.eta),
            methods=_checked_methods(self.methods),
            seed=check_int_range("seed", self.seed, 0, MAX_SEED),
            calib_samples=check_int_range("calib_samples", self.calib_samples, *CALIB_SAMPLES_RANGE),
            calib_seed=check_int_range("calib_seed", self.calib_seed, 0, MAX_CALIB_SEED),
        )

    def validated(self, model: DiffusionModel) -> "CompareConfig":
        """Check every field against `model`; return the config with defaults resolved."""
        config = self.checked()
        train_steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
        guidance = config.guidance
        if guidance is None:
            guidance = self.default_guidance(model.conditional)
        guidance = check_float_range("guidance", guidance, 0.0, MAX_GUIDANCE)
        if not model.conditional and guidance != 1.0:
            raise ConfigError("guidance", guidance, "1 (the model is unconditional: classifier-free guidance needs a class-conditional model)")
        class_label = config.class_label
        if class_label is not None:
            if not model.conditional:
                raise ConfigError("class", class_label, "none (the model is unconditional)")
            class_label = check_int_range("class", class_label, 0, model.num_classes - 1)
        return dataclasses.replace(
            config,
            steps=check_int_range("steps", config.steps, 1, train_steps),
            guidance=guidance,
            class_label=class_label,
            num_images=check_int_range("num_images", default_num_images(model.num_classes) if config.num_images is None
                                       else config.num_images, 1, MAX_POINTS if model.kind == "points" else MAX_IMAGES),
        )

    def stats_config(self, model: DiffusionModel) -> StatsConfig:
        return StatsConfig(
            model=model.identity,
            w_bits=int(self.w_bits),
            a_bits=int(self.a_bits),
            steps=int(self.steps),
            eta=float(self.eta),
            guidance=float(self.guidance),
            calib_samples=int(self.calib_samples),
            seed=int(self.calib_seed),
            range_method=self.range_method,
            keep_edge_layers_8bit=bool(self.keep_edge_layers_8bit),
            backbone=self.backbone,
        )
