"""Simulated post-training quantization of an ε-network (docs/method.md §5, docs/quantization.md).

Its settings (`QuantConfig`, the allowed bits, the backbones) are in `d2dpm.config`, so the CLI reads them
without importing torch; they are re-exported here.
`fake`: the grid, the quantized layer and the `Quantizer` that describes a quantized network;
`observer`: layer inputs seen on full-precision trajectories, turned into round-to-nearest;
`reconstruction`: bias correction (for all steps and per step) and AdaRound, fitted layer by layer on calibration inputs.
"""

from ..config import BACKBONES, DEFAULT_BACKBONE, NOT_QUANTIZED_BITS, QuantConfig
from .fake import (Efficiency, LayerQuantizer, QuantizedLayer, Quantizer, count_macs, efficiency, fake_quantize_weight,
                   quantizable_layers, quantize_activation, quantize_network, weight_grid)
from .observer import ActivationObserver, concat_splits
from .reconstruction import learn_rounding, mean_error_per_channel, reconstruct

__all__ = [
    "BACKBONES", "DEFAULT_BACKBONE", "NOT_QUANTIZED_BITS", "Efficiency", "LayerQuantizer", "QuantConfig", "QuantizedLayer",
    "Quantizer", "count_macs", "efficiency", "fake_quantize_weight", "quantizable_layers", "quantize_activation",
    "quantize_network", "weight_grid", "ActivationObserver", "concat_splits", "learn_rounding", "mean_error_per_channel",
    "reconstruct",
]
