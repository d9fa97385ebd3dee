"""The method registry: every row a comparison can show, by name (standard library only).

A method is a network (full precision or quantized) and a correction of its noise prediction
(`d2dpm.corrections`). The CLI, the statistics tables, the figures and both UIs read this one list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One row of a comparison: which network drives it and how its output is corrected."""

    name: str
    label: str
    network: str  # "fp" or "q"
    description: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fp", "FP", "fp", "full-precision network"),
        Method("q", "Quantized", "q", "quantized network, no correction"),
        Method("ptqd", "PTQD", "q", "PTQD: correlated-noise removal with residual variance absorbed (He et al. 2023)"),
        Method("s-d2", "S-D²", "q", "stochastic dual denoising: subtract a draw of N(μ_cond, σ_cond²)"),
        Method("d-d2", "D-D²", "q", "deterministic dual denoising: subtract μ_cond, absorb σ_cond² into σ_t'"),
        Method("mean-only", "D² mean only", "q", "subtract μ_cond only (ablation)"),
        Method("var-only", "D² variance only", "q", "absorb the unconditional σ_Δ² only (ablation, D mode)"),
        Method("s-var-only", "S-D² variance only", "q", "subtract a draw of N(0, σ_Δ²) only (ablation, S mode)"),
        Method("oracle", "Oracle", "q", "subtract the true Δ (needs the FP network: an upper bound)"),
    ]
}
ALLOWED_METHODS = ", ".join(METHODS)
