"""Simulated post-training quantization of an ε-network (METHOD.md §5).

Uniform affine fake quantization through torch's own ops: x_int = clamp(round(x/s) + z, 0, 2^b − 1),
x̃ = s·(x_int − z). Weights per output channel, layer inputs per tensor. The transform is
explicit: observe layer inputs on full-precision sampling trajectories (`ActivationObserver`),
turn them into ranges (`ActivationRanges`), then `quantize_network` returns a *new* network;
the FP network is left untouched, so both can run at once and no global switch exists.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import check_int_range

NOT_QUANTIZED_BITS = (16, 32)  # "16 or 32 bits" means the tensor stays in floating point
WEIGHT_BITS = (2, 8)
ACTIVATION_BITS = (4, 8)
EDGE_LAYER_BITS = 8  # first and last layer stay at 8 bits (Q-Diffusion, PTQD, D²-DPM)
RANGE_METHODS = ("mse", "minmax")
_CLIP_RATIOS = torch.linspace(1.0, 0.2, 33)  # the MSE search shrinks [min, max] by these factors
_OBSERVED_VALUES_PER_CALL = 4096  # random layer-input values kept per forward, for the MSE search

QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 8
    a_bits: int = 8
    range_method: str = "mse"  # how activation and weight clipping ranges are chosen
    keep_edge_layers_8bit: bool = True

    def __post_init__(self):
        object.__setattr__(self, "w_bits", check_int_range("w_bits", self.w_bits, *WEIGHT_BITS, extra=NOT_QUANTIZED_BITS))
        object.__setattr__(self, "a_bits", check_int_range("a_bits", self.a_bits, *ACTIVATION_BITS, extra=NOT_QUANTIZED_BITS))
        if self.range_method not in RANGE_METHODS:
            from .errors import ConfigError

            raise ConfigError("range_method", self.range_method, " or ".join(RANGE_METHODS))

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


def quantizable_layers(network: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in network.named_modules() if isinstance(module, QUANTIZABLE)}


def _affine_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the uniform grid over [low, high] (widened to contain 0)."""
    low = low.clamp(max=0.0)
    high = high.clamp(min=0.0)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp(min=1e-8)
    zero_point = torch.round(-low / scale).clamp(0, levels).to(torch.int32)
    return scale.float(), zero_point


def fake_quantize_weight(weight: torch.Tensor, bits: int, range_method: str) -> torch.Tensor:
    """Per-output-channel fake quantization, the clipping range searched for least MSE per channel."""
    if bits in NOT_QUANTIZED_BITS:
        return weight
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    ratios = _CLIP_RATIOS if range_method == "mse" else _CLIP_RATIOS[:1]
    best, best_error = None, None
    for ratio in ratios:
        scale, zero_point = _affine_params(low * ratio, high * ratio, bits)
        quantized = torch.fake_quantize_per_channel_affine(flat, scale, zero_point, 0, 0, 2**bits - 1)
        error = (quantized - flat).pow(2).mean(dim=1)
        if best is None:
            best, best_error = quantized, error
        else:
            better = error < best_error
            best = torch.where(better[:, None], quantized, best)
            best_error = torch.minimum(error, best_error)
    # empty_like keeps the weight's memory layout (channels-last for image networks, see models.py).
    return torch.empty_like(weight).copy_(best.reshape(weight.shape))


def _tensor_range(values: torch.Tensor, low: float, high: float, bits: int, range_method: str) -> tuple[float, int]:
    """Per-tensor scale and zero point; with "mse", the shrink factor of [low, high] that
    minimises the quantization MSE of the observed values."""
    low_t, high_t = torch.tensor(low), torch.tensor(high)
    ratios = _CLIP_RATIOS if range_method == "mse" else _CLIP_RATIOS[:1]
    best = None
    for ratio in ratios:
        scale, zero_point = _affine_params(low_t * ratio, high_t * ratio, bits)
        quantized = torch.fake_quantize_per_tensor_affine(values, float(scale), int(zero_point), 0, 2**bits - 1)
        error = float((quantized - values).pow(2).mean())
        if best is None or error < best[0]:
            best = (error, float(scale), int(zero_point))
    return best[1], best[2]


class ActivationObserver:
    """Records, for every Conv2d/Linear layer, the range and a random sample of its inputs.

    Used as a context manager around full-precision sampling (time-step-aware calibration:
    every step of the trajectories is seen). Also records which layer eats the network input
    first and which runs last, the layers kept at 8 bits.
    """

    def __init__(self, network: nn.Module, seed: int = 0):
        self.network = network
        self.layers = quantizable_layers(network)
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        self.order: list[str] = []  # layers in the order they first ran
        self.input_layer: str | None = None  # the first layer fed the network's own input tensor
        self._network_input: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._handles: list = []

    def _hook(self, name: str):
        def record(module, inputs):
            if self.input_layer is None and inputs[0] is self._network_input:
                self.input_layer = name
            x = inputs[0].detach().float().flatten()
            if name not in self.low:
                self.order.append(name)
                self.low[name], self.high[name] = float(x.min()), float(x.max())
            else:
                self.low[name] = min(self.low[name], float(x.min()))
                self.high[name] = max(self.high[name], float(x.max()))
            picks = torch.randint(0, x.numel(), (min(_OBSERVED_VALUES_PER_CALL, x.numel()),), generator=self._generator)
            self.samples[name].append(x[picks.to(x.device)].cpu())

        return record

    def _remember_input(self, module, args, kwargs):
        self._network_input = args[0] if args else next(iter(kwargs.values()), None)

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers.items()]
        self._handles.append(self.network.register_forward_pre_hook(self._remember_input, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._network_input = None

    def ranges(self, config: "QuantConfig") -> "ActivationRanges":
        """Bit-widths of every layer under `config`, and the per-tensor (scale, zero point) of its
        input at the layer's own activation bit-width."""
        missing = [name for name in self.layers if name not in self.low]
        if missing:
            raise RuntimeError(f"layers never ran during calibration: {missing[:3]}")
        first_layer = self.input_layer or self.order[0]
        edge_layers = {first_layer, self.order[-1]} if config.keep_edge_layers_8bit else set()
        bits, params = {}, {}
        for name in self.layers:
            bits[name] = _edge_bits(config, name in edge_layers)
            a_bits = bits[name][1]
            if a_bits in NOT_QUANTIZED_BITS:
                params[name] = (1.0, 0)
            else:
                values = torch.cat(self.samples[name])
                params[name] = _tensor_range(values, self.low[name], self.high[name], a_bits, config.range_method)
        return ActivationRanges(params, bits)


def _edge_bits(config: "QuantConfig", is_edge: bool) -> tuple[int, int]:
    """(weight bits, activation bits) of a layer: edge layers are raised to 8 bits, never lowered."""

    def raise_to_edge(bits: int) -> int:
        return bits if bits in NOT_QUANTIZED_BITS else max(bits, EDGE_LAYER_BITS)

    return (raise_to_edge(config.w_bits), raise_to_edge(config.a_bits)) if is_edge else (config.w_bits, config.a_bits)


@dataclass
class ActivationRanges:
    """The calibrated quantizer of every layer: bit-widths and input (scale, zero point)."""

    params: dict[str, tuple[float, int]]
    bits: dict[str, tuple[int, int]]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file: act.<layer> = [scale, zero point, weight bits, activation bits]."""
        return {
            f"act.{name}": torch.tensor([scale, float(zero), *map(float, self.bits[name])], dtype=torch.float64)
            for name, (scale, zero) in self.params.items()
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ActivationRanges":
        params, bits = {}, {}
        for key, value in tensors.items():
            if key.startswith("act."):
                params[key[4:]] = (float(value[0]), int(value[1]))
                bits[key[4:]] = (int(value[2]), int(value[3]))
        return cls(params, bits)


# torch.quantize_per_tensor is deprecated in favour of torchao, but on CPU it is ~10× faster than
# fake_quantize_per_tensor_affine (which also writes a gradient mask): the hot path of every
# quantized forward. Same grid, same rounding; tests hold it to the fake-quantize reference.
warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated", category=UserWarning)


def quantize_activation(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """x̃ = s·(clamp(round(x/s) + z, 0, 2^b − 1) − z), per tensor.

    Clamping x to the grid's range [−z·s, (2^b − 1 − z)·s] first lets the 8-bit kernel serve any
    b < 8: every value then rounds to one of the 2^b levels. At b = 8 the kernel's own clamp to
    [0, 255] is that range, and the extra pass over the tensor is skipped."""
    if bits < 8:
        x = x.clamp(-zero_point * scale, (2**bits - 1 - zero_point) * scale)
    return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).dequantize()


class QuantizedLayer(nn.Module):
    """A Conv2d/Linear whose weight is stored already fake-quantized and whose input is
    fake-quantized per tensor on every forward. The output is left in floating point."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int, act_params: tuple[float, int] | None, range_method: str):
        super().__init__()
        self.inner = layer
        self.w_bits, self.a_bits = w_bits, a_bits
        self.weight = nn.Parameter(fake_quantize_weight(layer.weight, w_bits, range_method), requires_grad=False)
        self.bias = layer.bias
        self.act_scale, self.act_zero_point = act_params if act_params is not None else (1.0, 0)
        self.quantize_input = a_bits not in NOT_QUANTIZED_BITS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = quantize_activation(x, self.act_scale, self.act_zero_point, self.a_bits)
        if isinstance(self.inner, nn.Conv2d):
            return self.inner._conv_forward(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}, {type(self.inner).__name__}"


def quantize_network(network: nn.Module, ranges: ActivationRanges, range_method: str = "mse") -> nn.Module:
    """A fake-quantized copy of `network`; `network` itself is not modified."""
    quantized = copy.deepcopy(network)
    for name, layer in list(quantizable_layers(quantized).items()):
        w_bits, a_bits = ranges.bits[name]
        parent_name, _, child = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        setattr(parent, child, QuantizedLayer(layer, w_bits, a_bits, ranges.params[name], range_method))
    return quantized.eval().requires_grad_(False)


# ---------------------------------------------------------------- efficiency (METHOD.md §5)


@dataclass(frozen=True)
class Efficiency:
    """Paper-style efficiency row: size in MB, BOPs per sample evaluation of the network."""

    fp_size_mb: float
    q_size_mb: float
    fp_gbops: float
    q_gbops: float

    @property
    def compression(self) -> float:
        return self.fp_size_mb / self.q_size_mb

    @property
    def bop_ratio(self) -> float:
        return self.fp_gbops / self.q_gbops

    def as_dict(self) -> dict:
        return {
            "fp_size_mb": self.fp_size_mb,
            "q_size_mb": self.q_size_mb,
            "compression": self.compression,
            "fp_gbops": self.fp_gbops,
            "q_gbops": self.q_gbops,
            "bop_ratio": self.bop_ratio,
        }


def count_macs(network: nn.Module, example_call) -> dict[str, int]:
    """Multiply-accumulates of every Conv2d/Linear layer on one real forward (`example_call()`)."""
    macs: dict[str, int] = {}
    handles = []
    for name, layer in quantizable_layers(network).items():

        def hook(module, inputs, output, name=name):
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            else:
                per_output = module.in_features
            macs[name] = macs.get(name, 0) + output.numel() * per_output

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            example_call()
    finally:
        for handle in handles:
            handle.remove()
    return macs


def efficiency(network: nn.Module, macs: dict[str, int], bits: dict[str, tuple[int, int]], batch: int) -> Efficiency:
    """Size: each quantized weight at its bit-width, every other parameter at 32 bits.
    BOPs: Σ 2·MACs·b_w·b_a over layers (FP counts 32 × 32), per sample."""

    def stored_bits(name: str) -> tuple[int, int]:  # a tensor left unquantized counts at 32 bits
        return tuple(32 if b in NOT_QUANTIZED_BITS else b for b in bits.get(name, (32, 32)))

    total_bits = sum(p.numel() for p in network.parameters()) * 32
    q_bits = total_bits - sum(layer.weight.numel() * (32 - stored_bits(name)[0]) for name, layer in quantizable_layers(network).items())
    fp_bops = sum(2 * count * 32 * 32 for count in macs.values()) / batch
    q_bops = sum(2 * count * math.prod(stored_bits(name)) for name, count in macs.items()) / batch
    megabyte = 8 * 1024 * 1024
    return Efficiency(total_bits / megabyte, q_bits / megabyte, fp_bops / 1e9, q_bops / 1e9)
