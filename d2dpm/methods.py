"""The method registry: every row a comparison can show, by name (standard library only).

A method is a network (full precision or quantized) and a correction of its noise prediction. Its
entry says everything the rest of the code needs: the label and colour every table, figure and UI
shows, the network that drives it, the correction class of `d2dpm.corrections` that makes it (and
its options), and how the UIs offer it. Adding a correction is its class, one entry here and its
test: the CLI, the sampler, the figures and both UIs read this list (docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

# How the UIs offer a method: always shown; its own checkbox ("extra row"); or chosen by the mean /
# variance / mode switches of dual denoising, which select the entry whose options match them.
ALWAYS, ROW, DUAL = "always", "row", "dual"


@dataclass(frozen=True)
class Method:
    """One row of a comparison: which network drives it, how its output is corrected, how it is drawn."""

    name: str
    label: str
    colour: str  # "#RRGGBB" (Okabe-Ito where it can), the same in every figure and both UIs
    network: str  # "fp" or "q"
    description: str
    correction: str = "Correction"  # the `d2dpm.corrections.Correction` class that makes it ...
    options: tuple[tuple[str, object], ...] = ()  # ... and its keyword arguments
    ui: str = ALWAYS  # ALWAYS, ROW or DUAL
    ui_label: str = ""  # a ROW's checkbox
    ui_hint: str = ""

    @property
    def kwargs(self) -> dict:
        return dict(self.options)


def _dual(mode: str, mean: bool, variance: bool) -> dict:
    """A D²-DPM variant: `DualDenoising` with these switches, chosen in the UIs by the same switches."""
    return dict(correction="DualDenoising", options=(("mode", mode), ("mean", mean), ("variance", variance)), ui=DUAL)


# FP black, the uncorrected quantized model vermillion, the baseline orange, D² in blues, the oracle green.
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fp", "FP", "#222222", "fp", "full-precision network"),
        Method("q", "Quantized", "#D55E00", "q", "quantized network, no correction"),
        Method("ptqd", "PTQD", "#E69F00", "q", "PTQD: correlated-noise removal with residual variance absorbed (He et al. 2023)",
               correction="PTQDCorrection", ui=ROW, ui_label="PTQD baseline row"),
        Method("s-d2", "S-D²", "#56B4E9", "q", "stochastic dual denoising: subtract a draw of N(μ_cond, σ_cond²)",
               **_dual("stochastic", mean=True, variance=True)),
        Method("d-d2", "D-D²", "#0072B2", "q", "deterministic dual denoising: subtract μ_cond, absorb σ_cond² into σ_t'",
               **_dual("deterministic", mean=True, variance=True)),
        Method("mean-only", "D² mean only", "#CC79A7", "q", "subtract μ_cond only (ablation)",
               **_dual("deterministic", mean=True, variance=False)),
        Method("var-only", "D² variance only", "#8C564B", "q", "absorb the unconditional σ_Δ² only (ablation, D mode)",
               **_dual("deterministic", mean=False, variance=True)),
        Method("s-var-only", "S-D² variance only", "#999999", "q", "subtract a draw of N(0, σ_Δ²) only (ablation, S mode)",
               **_dual("stochastic", mean=False, variance=True)),
        Method("oracle", "Oracle", "#009E73", "q", "subtract the true Δ (needs the FP network: an upper bound)",
               correction="OracleCorrection", ui=ROW, ui_label="Oracle row", ui_hint="subtracts the true Δ: an upper bound"),
    ]
}
ALLOWED_METHODS = ", ".join(METHODS)


def method_for_switches(mean: bool, variance: bool, mode: str) -> str | None:
    """The DUAL method a UI's (mean, variance, mode) switches select; None when both halves are off.
    With the variance half off, the stochastic and deterministic modes coincide (one entry serves both)."""
    for method in METHODS.values():
        if method.ui != DUAL:
            continue
        options = method.kwargs
        if (options["mean"], options["variance"]) == (bool(mean), bool(variance)) and (options["mode"] == mode or not variance):
            return method.name
    return None
