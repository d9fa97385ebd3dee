"""The standard post-training steps on top of round-to-nearest, fitted layer by layer in forward order.

- **Bias correction** (Nagel et al. 2019, empirical form): a quantized layer's output is off by a
  mean error per output channel, E[ỹ − y]; deterministic DDIM integrates such a constant over every
  step. Subtract it from the layer's bias.
- **AdaRound** (Nagel et al. 2020): instead of rounding each weight to nearest, choose floor or
  ceil by minimising the layer's output error on calibration data,

      min_V ‖W̃(V)·x̃ − W·x‖² + λ Σ (1 − |2h(V) − 1|^β),   W̃(V) = s·(clamp(⌊W/s⌋ + h(V) + z) − z),
      h(V) = clamp(sigmoid(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1,

  with β annealed from 20 to 2 after a warm-up without the regulariser, so every h ends at 0 or 1.

Both are fitted in one forward pass of the calibration inputs through a *dual* copy of the network:
every layer runs the FP layer on the first half of the batch (the FP path: x, y = W·x + b) and the
quantized layer on the second (the quantized path: x̃ comes from the layers already fitted). Each
layer is fitted when the pass reaches it, so it sees the inputs that the corrected layers before it
produce, and the error it removes includes that of its own input quantization (asymmetric
reconstruction, as AdaRound, BRECQ and Q-Diffusion do). The network must treat the samples of a
batch independently (GroupNorm, attention over positions: every diffusers UNet does).

**Time-step-aware bias correction**: when the calibration inputs carry their timesteps, each layer
also gets E[ỹ − y | t] for every step t among them (`LayerQuantizer.step_bias_corrections`): a
layer's mean error moves with t as its input range does. The quantized path then passes each sample
on corrected for its own step, so the layers after see what sampling will feed them.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .fake import LayerQuantizer, Quantizer, current_timestep, layer_output, replace_layers, watch_timestep

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
ADAROUND_ITERATIONS = 500
ADAROUND_BATCH = 32  # calibration inputs (images, or rows of a Linear) per iteration
ADAROUND_LR = 1e-2
ADAROUND_REG_WEIGHT = 0.01  # λ, against the reconstruction error summed over output channels
ADAROUND_WARMUP = 0.2  # share of iterations without the rounding regulariser
ADAROUND_BETA = (20.0, 2.0)

ProgressCallback = Callable[[float, str], None]


def _channel_dim(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv2d) else -1


def _per_channel(layer: nn.Module, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over the layer's output `like`."""
    return values.to(like).view((-1,) + (1,) * (like.dim() - 2)) if isinstance(layer, nn.Conv2d) else values.to(like)


def mean_error_per_channel(layer: nn.Module, error: torch.Tensor) -> torch.Tensor:
    """E[ỹ − y] per output channel, over samples and positions (float64 sums)."""
    dim = _channel_dim(layer)
    moved = error.double().movedim(dim, 0).reshape(error.shape[dim], -1)
    return moved.mean(dim=1).float()


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def learn_rounding(layer: nn.Module, quantizer: LayerQuantizer, x_quantized: torch.Tensor, target: torch.Tensor,
                   iterations: int = ADAROUND_ITERATIONS, seed: int = 0) -> torch.Tensor:
    """AdaRound for one layer: the rounding (True = up from floor) of every weight that makes
    W̃·x̃ match `target` = W·x (both without bias). `x_quantized` is the layer's input on the
    quantized path, already input-quantized."""
    weight = layer.weight.detach().float().contiguous()
    levels = 2**quantizer.w_bits - 1
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale = quantizer.weight_scale.to(weight.device).view(shape)
    zero = quantizer.weight_zero_point.to(weight.device).float().view(shape)
    floor = torch.floor(weight / scale)
    rest = (weight / scale - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(v) = rest: starts at W itself
    optimizer = torch.optim.Adam([v], lr=ADAROUND_LR)
    if isinstance(layer, nn.Linear):  # a Linear sees rows of features; sample rows, not whole samples
        x_quantized = x_quantized.reshape(-1, x_quantized.shape[-1])
        target = target.reshape(-1, target.shape[-1])
        batch = ADAROUND_BATCH * 64
    else:
        batch = ADAROUND_BATCH
    generator = torch.Generator().manual_seed(seed)
    warmup = int(ADAROUND_WARMUP * iterations)
    with torch.enable_grad():
        for iteration in range(iterations):
            picks = torch.randint(0, x_quantized.shape[0], (min(batch, x_quantized.shape[0]),), generator=generator).to(weight.device)
            h = rectified_sigmoid(v)
            quantized_weight = scale * ((floor + h + zero).clamp(0, levels) - zero)
            output = layer_output(layer, x_quantized[picks], quantized_weight.to(layer.weight.dtype), None)
            loss = (output - target[picks]).pow(2).sum(_channel_dim(layer)).mean()
            if iteration >= warmup:
                progress = (iteration - warmup) / max(iterations - warmup, 1)
                beta = ADAROUND_BETA[1] + (ADAROUND_BETA[0] - ADAROUND_BETA[1]) * (1 - progress)
                loss = loss + ADAROUND_REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (v.detach() >= 0).cpu()  # h(v) ≥ ½ ⇔ v ≥ 0


class _DualLayer(nn.Module):
    """FP layer on the first half of the batch, the quantized layer (fitted on the spot) on the second."""

    def __init__(self, name: str, layer: nn.Module, fit: Callable[[str, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.name, self.layer, self.fit = name, layer, fit
        self.fitted = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fitted:
            raise RuntimeError(f"layer {self.name} ran twice in one forward: layer-wise fitting needs each layer once")
        self.fitted = True
        x_fp, x_q = x.chunk(2)
        y_fp = self.layer(x_fp)
        return torch.cat([y_fp, self.fit(self.name, self.layer, x_fp, x_q, y_fp)])


def reconstruct(network: nn.Module, quantizer: Quantizer, forward: Callable[[nn.Module, tuple], torch.Tensor], inputs: tuple,
                learn_rounding_too: bool, progress: ProgressCallback | None = None,
                iterations: int = ADAROUND_ITERATIONS, seed: int = 0) -> Quantizer:
    """Fit bias corrections, for all steps and per step (and, if `learn_rounding_too`, AdaRound's
    rounding first), to every quantized layer of `quantizer`, in forward order, on the calibration
    `inputs` (a tuple of tensors whose first dimension indexes the samples; `forward(network, inputs)`
    runs the network). Returns a new `Quantizer`; `network` and `quantizer` are not modified."""
    layers = {name: copy.copy(layer) for name, layer in quantizer.layers.items()}
    total, done = len(layers), 0

    @torch.no_grad()
    def fit(name: str, layer: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, y_fp: torch.Tensor) -> torch.Tensor:
        nonlocal done
        spec = layers[name]
        x_quantized = spec.quantize_input(x_q)
        bias = layer.bias
        if learn_rounding_too and spec.weight_scale is not None:
            target = y_fp - _per_channel(layer, bias, y_fp) if bias is not None else y_fp
            spec.rounding_up = learn_rounding(layer, spec, x_quantized, target, iterations, seed)
        y_q = layer_output(layer, x_quantized, spec.quantized_weight(layer.weight), bias)
        error = y_q - y_fp
        correction = mean_error_per_channel(layer, error)
        spec.bias_correction = correction.cpu()
        timesteps = current_timestep()
        if timesteps is None:
            corrected = y_q - _per_channel(layer, correction, y_q)
        else:  # one correction per step, each sample corrected with its own step's
            timesteps = torch.as_tensor(timesteps).expand(y_q.shape[0]).to(y_q.device)
            spec.step_bias_corrections, corrected = {}, torch.empty_like(y_q)
            for t in timesteps.unique().tolist():
                rows = (timesteps == t).nonzero().flatten()
                step_correction = mean_error_per_channel(layer, error[rows])
                spec.step_bias_corrections[int(t)] = step_correction.cpu()
                corrected[rows] = y_q[rows] - _per_channel(layer, step_correction, y_q)
        done += 1
        if progress is not None:
            progress(done / total, f"{'AdaRound and bias' if learn_rounding_too else 'bias'} correction: layer {done}/{total} ({name})")
        return corrected

    dual = replace_layers(copy.deepcopy(network), lambda name, layer: _DualLayer(name, layer, fit))
    # The quantized half's per-step grids and corrections need each of its samples' timesteps (the second half).
    watch_timestep(dual, select=lambda timesteps: timesteps[timesteps.shape[0] // 2:])
    with torch.no_grad():
        forward(dual, tuple(torch.cat([tensor, tensor]) if isinstance(tensor, torch.Tensor) else tensor for tensor in inputs))
    unfitted = [name for name, module in dual.named_modules() if isinstance(module, _DualLayer) and not module.fitted]
    if unfitted:
        raise RuntimeError(f"layers never ran in the calibration forward: {unfitted[:3]}")
    return Quantizer(quantizer.backbone, layers)
