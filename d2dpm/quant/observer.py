"""Watching the full-precision network at work: the range and a sample of every layer's input.

Used as a context manager around full-precision sampling (time-step-aware calibration: every step
of the calibration trajectories is seen). It also finds the layers kept at 8 bits (the one that
eats the network's own input, and the last to run) and, for split quantization, where the inputs
of the layers after a skip concatenation divide.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import NOT_QUANTIZED_BITS, QuantConfig
from .fake import InputGrid, LayerQuantizer, Quantizer, quantizable_layers, tensor_grid, timestep_of, weight_grid

OBSERVED_VALUES_PER_CALL = 4096  # random layer-input values kept per forward and input part, for the MSE search


def concat_splits(network: nn.Module) -> dict[str, int]:
    """Layers whose input is torch.cat([upsampled path, skip connection]) in a diffusers UNet's up
    blocks, and the channel where the skip part starts (Q-Diffusion's split quantization).

    Every resnet of an up block gets the concatenation: its first conv (after GroupNorm and SiLU,
    which act per channel group and keep the split) and its 1×1 shortcut (on the raw concatenation).
    The upsampled part has the channels of the block before (the mid block's for the first resnet
    of the first up block), then the block's own output channels.
    """
    up_blocks = getattr(network, "up_blocks", None)
    config = getattr(network, "config", None)
    if up_blocks is None or config is None or "block_out_channels" not in config:
        return {}
    splits = {}
    previous = config.block_out_channels[-1]
    for b, block in enumerate(up_blocks):
        for r, resnet in enumerate(block.resnets):
            hidden = previous if r == 0 else resnet.out_channels
            if resnet.in_channels <= hidden:
                raise RuntimeError(f"up_blocks.{b}.resnets.{r}: input of {resnet.in_channels} channels holds no skip after {hidden}")
            for layer in ("conv1", "conv_shortcut"):
                if isinstance(getattr(resnet, layer, None), nn.Conv2d):
                    splits[f"up_blocks.{b}.resnets.{r}.{layer}"] = hidden
        previous = block.resnets[-1].out_channels
    return splits


class ActivationObserver:
    """Records, for every Conv2d/Linear layer (and every part of a split input), the range and a
    random sample of its inputs: over all calls, and per timestep for calls whose samples share one
    (every call of the sampler does), for time-step-aware input grids."""

    def __init__(self, network: nn.Module, seed: int = 0, splits: dict[str, int] | None = None):
        self.network = network
        self.layers = quantizable_layers(network)
        self.splits = splits or {}
        # keyed by (layer, part, timestep); timestep None gathers every call
        self.low: dict[tuple[str, int, int | None], float] = {}
        self.high: dict[tuple[str, int, int | None], float] = {}
        self.samples: dict[tuple[str, int, int | None], list[torch.Tensor]] = {}
        self.timesteps: set[int] = set()  # those that calls had to themselves
        self.order: list[str] = []  # layers in the order they first ran
        self.input_layer: str | None = None  # the first layer fed the network's own input tensor
        self._network_input: torch.Tensor | None = None
        self._timestep: int | None = None  # of the forward running, if its samples share one
        self._generator = torch.Generator().manual_seed(seed)
        self._handles: list = []

    def _parts(self, name: str, x: torch.Tensor) -> list[torch.Tensor]:
        if name in self.splits:
            first = self.splits[name]
            return [x[:, :first], x[:, first:]]
        return [x]

    def _hook(self, name: str):
        def record(module, inputs):
            if self.input_layer is None and inputs[0] is self._network_input:
                self.input_layer = name
            if name not in self.order:
                self.order.append(name)
            for part, values in enumerate(self._parts(name, inputs[0].detach())):
                values = values.float().flatten()
                low, high = float(values.min()), float(values.max())
                picks = torch.randint(0, values.numel(), (min(OBSERVED_VALUES_PER_CALL, values.numel()),), generator=self._generator)
                picked = values[picks.to(values.device)].cpu()
                for key in {(name, part, None), (name, part, self._timestep)}:
                    self.low[key] = min(self.low.get(key, low), low)
                    self.high[key] = max(self.high.get(key, high), high)
                    self.samples.setdefault(key, []).append(picked)

        return record

    def _remember_input(self, module, args, kwargs):
        self._network_input = args[0] if args else next(iter(kwargs.values()), None)
        timestep = timestep_of(args, kwargs)
        self._timestep = timestep if isinstance(timestep, int) else None
        if self._timestep is not None:
            self.timesteps.add(self._timestep)

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers.items()]
        self._handles.append(self.network.register_forward_pre_hook(self._remember_input, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._network_input = None

    def input_grid(self, name: str, a_bits: int, range_method: str, timestep: int | None = None) -> InputGrid:
        """(first channel, scale, zero point) of each part of layer `name`'s input at `a_bits`, fitted
        to the inputs of every call, or of the calls at `timestep` alone."""
        if a_bits in NOT_QUANTIZED_BITS:
            return []
        firsts = [0, self.splits[name]] if name in self.splits else [0]
        grid = []
        for part, first in enumerate(firsts):
            key = (name, part, timestep)
            scale, zero_point = tensor_grid(torch.cat(self.samples[key]), self.low[key], self.high[key], a_bits, range_method)
            grid.append((first, scale, zero_point))
        return grid

    def round_to_nearest(self, config: QuantConfig, backbone: str | None = None) -> Quantizer:
        """The round-to-nearest quantizer of every layer under `config`: bit-widths (edge layers at
        8 bits, the network's own input in float), input grids from the observed values, per-channel
        weight grids. Every backbone but `rtn` gets an input grid per observed timestep too
        (`LayerQuantizer.step_grids`); `rtn` stays the plain one-range-per-layer quantizer."""
        missing = [name for name in self.layers if name not in self.order]
        if missing:
            raise RuntimeError(f"layers never ran during calibration: {missing[:3]}")
        input_layer = self.input_layer or self.order[0]
        edge_layers = {input_layer, self.order[-1]}
        backbone = backbone or config.backbone
        step_timesteps = sorted(self.timesteps) if backbone != "rtn" else []
        layers = {}
        for name, layer in self.layers.items():
            w_bits, a_bits = config.layer_bits(name in edge_layers, takes_network_input=name == input_layer)
            scale = zero_point = None
            if w_bits not in NOT_QUANTIZED_BITS:
                scale, zero_point = weight_grid(layer.weight, w_bits, config.range_method)
            grid = self.input_grid(name, a_bits, config.range_method)
            step_grids = {t: self.input_grid(name, a_bits, config.range_method, t) for t in step_timesteps} if grid else {}
            layers[name] = LayerQuantizer(w_bits, a_bits, grid, scale, zero_point, step_grids=step_grids)
        return Quantizer(backbone, layers)
