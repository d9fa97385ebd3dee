"""Distances of each method's trajectory and samples to the full-precision ones."""

from __future__ import annotations

import math

import pandas as pd
import torch

from .sampler import StepRecord


def sigma_value(sigma: float | torch.Tensor) -> float:
    """A σ as one number for tables: the mean over channels when it is per channel."""
    return float(sigma.float().mean()) if isinstance(sigma, torch.Tensor) else float(sigma)


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.double().pow(2).mean().sqrt())


def trajectory_table(records: list[dict[str, StepRecord]], reference: str = "fp") -> pd.DataFrame:
    """One row per method and step: RMSE of x_t and of the predicted x_0 to the reference
    trajectory, mean and std of x_t, the σ applied and the size of the correction."""
    rows = []
    for step_records in records:
        ref = step_records[reference]
        for method, record in step_records.items():
            rows.append(
                {
                    "method": method,
                    "step": record.step,
                    "t": record.t,
                    "rmse_xt": _rms(record.x_t - ref.x_t),
                    "rmse_x0": _rms(record.x0 - ref.x0),
                    "rmse_x_prev": _rms(record.x_prev - ref.x_prev),
                    "mean_xt": float(record.x_t.double().mean()),
                    "std_xt": float(record.x_t.double().std()),
                    "sigma_applied": sigma_value(record.sigma),
                    "correction_rms": _rms(record.correction) if record.correction is not None else 0.0,
                }
            )
    return pd.DataFrame(rows)


def per_image_errors(samples: torch.Tensor, reference: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE per sample, and PSNR per image, of the images as shown: mapped from [-1, 1] to [0, 1] and
    clipped there (peak 1), as every view and saved PNG shows them, so a pixel that left the data
    range counts as far as it is seen to be off, not as far as its raw value went.

    For point clouds the MSE is in data units and the PSNR is NaN.
    """
    if kind == "image":
        samples, reference = samples.clamp(-1, 1), reference.clamp(-1, 1)
    diff = (samples.double() - reference.double()).flatten(1)
    if kind == "image":
        mse = (diff / 2).pow(2).mean(1)  # [-1, 1] → [0, 1] halves every difference
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
    else:
        mse = diff.pow(2).mean(1)
        psnr = torch.full_like(mse, math.nan)
    return mse, psnr
