"""Uniform affine fake quantization and the quantized layer (docs/method.md §5).

x_int = clamp(round(x/s) + z, 0, 2^b − 1), x̃ = s·(x_int − z), through torch's own ops. Weights per
output channel, layer inputs per tensor (or per part of a concatenated input, see `LayerQuantizer`).
A `Quantizer` holds everything that defines the quantized network, layer by layer, so it can be
saved beside the noise statistics it produced and rebuilt exactly; `quantize_network` returns a
*new* network and leaves the FP one untouched, so both can run at once and no global switch exists. The settings (`QuantConfig`) are in `d2dpm.config`.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import NOT_QUANTIZED_BITS
from ..errors import ConfigError

_CLIP_RATIOS = torch.linspace(1.0, 0.2, 33)  # the MSE search shrinks [min, max] by these factors

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def quantizable_layers(network: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in network.named_modules() if isinstance(module, QUANTIZABLE)}


def affine_grid(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the uniform grid over [low, high] (widened to contain 0)."""
    low = low.clamp(max=0.0)
    high = high.clamp(min=0.0)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp(min=1e-8)
    zero_point = torch.round(-low / scale).clamp(0, levels).to(torch.int32)
    return scale.float(), zero_point


def weight_grid(weight: torch.Tensor, bits: int, range_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (scale, zero point); with "mse", each channel's [min, max] is shrunk by
    the factor that minimises that channel's rounding MSE."""
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    ratios = _CLIP_RATIOS if range_method == "mse" else _CLIP_RATIOS[:1]
    best_scale, best_zero, best_error = None, None, None
    for ratio in ratios:
        scale, zero_point = affine_grid(low * ratio, high * ratio, bits)
        quantized = torch.fake_quantize_per_channel_affine(flat, scale, zero_point, 0, 0, 2**bits - 1)
        error = (quantized - flat).pow(2).mean(dim=1)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero_point, error
        else:
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero_point, best_zero)
            best_error = torch.minimum(error, best_error)
    return best_scale, best_zero


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def fake_quantize_weight(weight: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor,
                         rounding_up: torch.Tensor | None = None) -> torch.Tensor:
    """Weights on the per-channel grid (scale, zero point): rounded to nearest, or, with AdaRound's
    `rounding_up` (bool, shaped like the weight), floor(W/s) + 1 where it is set and floor(W/s) elsewhere."""
    levels = 2**bits - 1
    if rounding_up is None:
        quantized = torch.fake_quantize_per_channel_affine(weight.detach().float(), scale.to(weight.device),
                                                           zero_point.to(weight.device), 0, 0, levels)
    else:
        s, z = _per_channel(scale, weight), _per_channel(zero_point, weight).float()
        integer = (torch.floor(weight.detach().float() / s) + rounding_up.to(weight.device).float() + z).clamp(0, levels)
        quantized = s * (integer - z)
    # empty_like keeps the weight's memory layout (channels-last for image networks, see models.py).
    return torch.empty_like(weight).copy_(quantized)


def tensor_grid(values: torch.Tensor, low: float, high: float, bits: int, range_method: str) -> tuple[float, int]:
    """Per-tensor scale and zero point; with "mse", the shrink factor of [low, high] that
    minimises the quantization MSE of the observed values."""
    low_t, high_t = torch.tensor(low), torch.tensor(high)
    ratios = _CLIP_RATIOS if range_method == "mse" else _CLIP_RATIOS[:1]
    best = None
    for ratio in ratios:
        scale, zero_point = affine_grid(low_t * ratio, high_t * ratio, bits)
        quantized = torch.fake_quantize_per_tensor_affine(values, float(scale), int(zero_point), 0, 2**bits - 1)
        error = float((quantized - values).pow(2).mean())
        if best is None or error < best[0]:
            best = (error, float(scale), int(zero_point))
    return best[1], best[2]


# torch.quantize_per_tensor is deprecated in favour of torchao, but on CPU it is ~10× faster than
# fake_quantize_per_tensor_affine (which also writes a gradient mask): the hot path of every
# quantized forward. Same grid, same rounding; tests hold it to the fake-quantize reference.
warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated", category=UserWarning)


def quantize_activation(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """x̃ = s·(clamp(round(x/s) + z, 0, 2^b − 1) − z), per tensor.

    Clamping x to the grid's range [−z·s, (2^b − 1 − z)·s] first lets the 8-bit kernel serve any
    b < 8: every value then rounds to one of the 2^b levels. At b = 8 the kernel's own clamp to
    [0, 255] is that range, and the extra pass over the tensor is skipped.

    The kernel takes any strides and keeps the input's memory layout, so a channels-last input
    (models.py) stays channels-last for the convolution after it: no copy either way."""
    if bits < 8:
        x = x.clamp(-zero_point * scale, (2**bits - 1 - zero_point) * scale)
    return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).dequantize()


# The timestep of the forward running in this thread, for per-step input grids. Thread-local: one
# quantized network serves several threads at once (the app's visitors), each at its own step.
_forward_timestep = threading.local()

InputGrid = list[tuple[int, float, int]]  # (first channel, scale, zero point) of each part of a layer's input


def timestep_of(args: tuple, kwargs: dict) -> int | torch.Tensor | None:
    """The timestep argument of a diffusers-style forward(sample, timestep, …): one int when every
    sample shares it, else the per-sample tensor; None for a network called without one."""
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if timestep is None:
        return None
    timestep = torch.as_tensor(timestep).flatten()
    first = int(timestep[0])
    return first if bool((timestep == first).all()) else timestep.cpu()


def watch_timestep(network: nn.Module, select=lambda timestep: timestep) -> list:
    """Make every forward of `network` publish its timestep (a per-sample tensor passed through
    `select`) for the quantized layers inside it (`current_timestep`); returns the hooks' handles."""

    def enter(module, args, kwargs):
        timestep = timestep_of(args, kwargs)
        _forward_timestep.value = select(timestep) if isinstance(timestep, torch.Tensor) else timestep

    def leave(module, args, output):
        _forward_timestep.value = None

    return [network.register_forward_pre_hook(enter, with_kwargs=True), network.register_forward_hook(leave)]


def current_timestep() -> int | torch.Tensor | None:
    return getattr(_forward_timestep, "value", None)


def layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the Conv2d/Linear `layer` computes on `x` with `weight` and `bias` in place of its own."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def nearest_calibrated(calibrated: dict[int, object], timestep: int) -> int:
    """The calibrated timestep closest to `timestep` (the smaller one on a tie)."""
    if timestep in calibrated:
        return timestep
    return min(sorted(calibrated), key=lambda t: abs(t - timestep))


@dataclass
class LayerQuantizer:
    """How one Conv2d/Linear is quantized.

    `input_grid` holds one (first channel, scale, zero point) per part of the layer's input: one
    part, or two where the input is a concatenation of a skip connection with the upsampled path
    (Q-Diffusion's split quantization: each half gets its own range). Empty when the input stays
    in floating point; `weight_scale` is None when the weights do.

    `step_grids` (time-step-aware ranges): an input grid per calibrated timestep t. A layer's input
    range moves a lot over the sampling steps; one grid for all of them either clips the wide steps or
    wastes levels on the narrow ones. Used when the forward's timestep is known; a timestep that was
    not calibrated takes the grid of the nearest one, and `input_grid` (all steps) serves otherwise.

    `step_bias_corrections` (time-step-aware bias correction): E[ỹ − y] per output channel fitted on
    each calibrated step's inputs alone. The mean error of a layer moves with t as its input range
    does, and DDIM integrates what is left of it at every step. Looked up like the step grids;
    `bias_correction` (all steps) serves when the timestep is unknown.
    """

    w_bits: int
    a_bits: int
    input_grid: InputGrid = field(default_factory=list)
    weight_scale: torch.Tensor | None = None  # [C_out]
    weight_zero_point: torch.Tensor | None = None  # [C_out] int32
    rounding_up: torch.Tensor | None = None  # AdaRound: bool like the weight, True = floor(W/s) + 1
    bias_correction: torch.Tensor | None = None  # [C_out], subtracted from the layer's output
    step_grids: dict[int, InputGrid] = field(default_factory=dict)
    step_bias_corrections: dict[int, torch.Tensor] = field(default_factory=dict)  # t → [C_out]

    def grid_at(self, timestep: int) -> InputGrid:
        return self.step_grids[nearest_calibrated(self.step_grids, timestep)]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_grid:
            return x
        timestep = current_timestep() if self.step_grids else None
        if timestep is None:
            return self._on_grid(x, self.input_grid)
        if isinstance(timestep, int):
            return self._on_grid(x, self.grid_at(timestep))
        quantized = torch.empty_like(x)  # samples at different steps (the backbone's fitting): each on its own grid
        for value in timestep.unique().tolist():
            rows = (timestep == value).nonzero().flatten().to(x.device)
            quantized[rows] = self._on_grid(x[rows], self.grid_at(value))
        return quantized

    def _on_grid(self, x: torch.Tensor, grid: InputGrid) -> torch.Tensor:
        if len(grid) == 1:
            _, scale, zero_point = grid[0]
            return quantize_activation(x, scale, zero_point, self.a_bits)
        ends = [first for first, _, _ in grid[1:]] + [x.shape[1]]
        return torch.cat([quantize_activation(x[:, first:end], scale, zero_point, self.a_bits)
                          for (first, scale, zero_point), end in zip(grid, ends)], dim=1)

    def quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            return weight
        return fake_quantize_weight(weight, self.w_bits, self.weight_scale, self.weight_zero_point, self.rounding_up)


class QuantizedLayer(nn.Module):
    """A Conv2d/Linear whose weight is stored already fake-quantized and whose input is
    fake-quantized on every forward. The output is left in floating point."""

    def __init__(self, layer: nn.Module, quantizer: LayerQuantizer):
        super().__init__()
        self.inner = layer
        self.quantizer = quantizer
        self.w_bits, self.a_bits = quantizer.w_bits, quantizer.a_bits
        self.weight = nn.Parameter(quantizer.quantized_weight(layer.weight), requires_grad=False)
        bias = layer.bias
        if quantizer.bias_correction is not None:  # folded into the bias: what a forward without a timestep uses
            correction = quantizer.bias_correction.to(layer.weight)
            bias = nn.Parameter((bias.detach() if bias is not None else 0) - correction, requires_grad=False)
        self.bias = bias
        # Per-step corrections: the layer's bias with each calibrated step's correction folded in, one
        # row per step, so a forward at one timestep costs no more than with the all-steps bias.
        steps = sorted(quantizer.step_bias_corrections)
        self._step_row = {t: row for row, t in enumerate(steps)}
        step_biases = None
        if steps:
            base = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.weight.shape[0])
            step_biases = torch.stack([base - quantizer.step_bias_corrections[t].to(base) for t in steps])
        self.register_buffer("step_biases", None if step_biases is None else step_biases.to(layer.weight))

    def _row(self, timestep: int) -> int:
        row = self._step_row.get(timestep)
        return row if row is not None else self._step_row[nearest_calibrated(self._step_row, timestep)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantizer.quantize_input(x)
        timestep = current_timestep() if self.step_biases is not None else None
        if timestep is None:
            return layer_output(self.inner, x, self.weight, self.bias)
        if isinstance(timestep, int):
            return layer_output(self.inner, x, self.weight, self.step_biases[self._row(timestep)])
        # Samples at different steps: each gets its own step's bias.
        rows = torch.tensor([self._row(t) for t in timestep.tolist()], device=self.step_biases.device)
        biases = self.step_biases[rows]  # [B, C_out]
        y = layer_output(self.inner, x, self.weight, None)
        if isinstance(self.inner, nn.Conv2d):
            return y + biases.view(biases.shape[0], -1, 1, 1)
        return y + biases.view(biases.shape[0], *[1] * (y.dim() - 2), -1)

    def extra_repr(self) -> str:
        parts = ", split input" if len(self.quantizer.input_grid) > 1 else ""
        steps = f", input grids for {len(self.quantizer.step_grids)} steps" if self.quantizer.step_grids else ""
        return f"W{self.w_bits}A{self.a_bits}{parts}{steps}, {type(self.inner).__name__}"


@dataclass
class Quantizer:
    """The quantized network, layer by layer, and the backbone that made it."""

    backbone: str
    layers: dict[str, LayerQuantizer]

    @property
    def bits(self) -> dict[str, tuple[int, int]]:
        return {name: (layer.w_bits, layer.a_bits) for name, layer in self.layers.items()}

    # -- safetensors: flat tensors under "quant.<layer>.<field>"

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.layers.items():
            prefix = f"quant.{name}."
            tensors[prefix + "bits"] = torch.tensor([layer.w_bits, layer.a_bits], dtype=torch.int32)
            tensors[prefix + "input_grid"] = torch.tensor(layer.input_grid, dtype=torch.float64).reshape(-1, 3)
            if layer.weight_scale is not None:
                tensors[prefix + "weight_scale"] = layer.weight_scale.float().cpu().contiguous()
                tensors[prefix + "weight_zero_point"] = layer.weight_zero_point.to(torch.int32).cpu().contiguous()
            if layer.rounding_up is not None:  # one bit per weight, and the weight's shape to unpack them
                tensors[prefix + "rounding_up"] = torch.from_numpy(np.packbits(layer.rounding_up.cpu().flatten().numpy()))
                tensors[prefix + "rounding_shape"] = torch.tensor(layer.rounding_up.shape, dtype=torch.int64)
            if layer.bias_correction is not None:
                tensors[prefix + "bias_correction"] = layer.bias_correction.float().cpu().contiguous()
            if layer.step_bias_corrections:  # a row per calibrated step
                steps = sorted(layer.step_bias_corrections)
                tensors[prefix + "step_bias_timesteps"] = torch.tensor(steps, dtype=torch.int64)
                tensors[prefix + "step_bias_corrections"] = torch.stack(
                    [layer.step_bias_corrections[t].float().cpu() for t in steps]).contiguous()
            if layer.step_grids:  # rows of (t, first channel, scale, zero point)
                tensors[prefix + "step_grids"] = torch.tensor(
                    [(t, *part) for t, grid in layer.step_grids.items() for part in grid], dtype=torch.float64)
        return tensors

    @classmethod
    def from_tensors(cls, backbone: str, tensors: dict[str, torch.Tensor]) -> "Quantizer":
        """Read back what `to_tensors` wrote (a KeyError if a layer's entry is incomplete)."""
        layers = {}
        names = [key[len("quant."):-len(".bits")] for key in tensors if key.startswith("quant.") and key.endswith(".bits")]
        for name in names:
            prefix = f"quant.{name}."
            w_bits, a_bits = (int(b) for b in tensors[prefix + "bits"])
            grid = [(int(first), float(scale), int(zero)) for first, scale, zero in tensors[prefix + "input_grid"].tolist()]
            rounding = tensors.get(prefix + "rounding_up")
            if rounding is not None:
                shape = tuple(int(n) for n in tensors[prefix + "rounding_shape"])
                bits = np.unpackbits(rounding.numpy(), count=math.prod(shape)).astype(bool)
                rounding = torch.from_numpy(bits).view(shape)
            step_grids: dict[int, InputGrid] = {}
            for t, first, scale, zero in tensors.get(prefix + "step_grids", torch.empty(0, 4)).tolist():
                step_grids.setdefault(int(t), []).append((int(first), float(scale), int(zero)))
            step_timesteps = tensors.get(prefix + "step_bias_timesteps", torch.empty(0)).tolist()
            step_rows = tensors.get(prefix + "step_bias_corrections", torch.empty(0))
            if len(step_timesteps) != len(step_rows):
                raise KeyError(f"{prefix}step_bias_corrections: {len(step_rows)} rows for {len(step_timesteps)} timesteps")
            step_corrections = dict(zip(step_timesteps, step_rows))
            layers[name] = LayerQuantizer(w_bits, a_bits, grid, tensors.get(prefix + "weight_scale"),
                                          tensors.get(prefix + "weight_zero_point"), rounding, tensors.get(prefix + "bias_correction"),
                                          step_grids, step_corrections)
        return cls(backbone, layers)


def quantize_network(network: nn.Module, quantizer: Quantizer) -> nn.Module:
    """A fake-quantized copy of `network`; `network` itself is not modified."""
    layers = quantizable_layers(network)
    def fits(name: str, q: LayerQuantizer) -> bool:
        weight_shape, channels = tuple(layers[name].weight.shape), (layers[name].weight.shape[0],)
        return ((q.rounding_up is None or tuple(q.rounding_up.shape) == weight_shape)
                and all(tuple(c.shape) == channels for c in q.step_bias_corrections.values()))

    if set(layers) != set(quantizer.layers) or not all(fits(name, q) for name, q in quantizer.layers.items()):
        raise ConfigError("stats", "a quantizer made for another network", "statistics made for this model's network")
    quantized = replace_layers(copy.deepcopy(network), lambda name, layer: QuantizedLayer(layer, quantizer.layers[name]))
    if any(layer.step_grids or layer.step_bias_corrections for layer in quantizer.layers.values()):
        watch_timestep(quantized)
    return quantized.eval().requires_grad_(False)


def replace_layers(network: nn.Module, make) -> nn.Module:
    """`network` with every Conv2d/Linear replaced, in place, by `make(name, layer)`; returns the
    new root (the replacement itself when `network` is a single layer)."""
    for name, layer in list(quantizable_layers(network).items()):
        if not name:
            return make(name, layer)
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name), child, make(name, layer))
    return network


# ---------------------------------------------------------------- efficiency (docs/method.md §5)


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
