"""The Method page of both UIs: short teaching text with the equations of docs/method.md in LaTeX.

Markdown with `$…$` (inline) and `$$…$$` (display) math, which Gradio's Markdown and
Streamlit's st.markdown both render with KaTeX. Plain strings only: no UI library here.
"""

from __future__ import annotations

PAPER_URL = "https://arxiv.org/abs/2501.08180"
CODE_URL = "https://github.com/TaylorJocelyn/D2-DPM"
PTQD_URL = "https://arxiv.org/abs/2305.10657"

INTRO = f"""
### Quantized diffusion, and how D²-DPM repairs it

A diffusion model makes an image by starting from pure noise and removing a little noise at each
of a few dozen steps; at every step a network $\\epsilon_\\theta(x_t, t)$ predicts the noise.
**Post-training quantization** stores that network's weights and activations in 4–8 bits instead of 32:
the model becomes 4–8× smaller and much cheaper to run, but its prediction picks up an error,
the **quantization noise** $\\Delta$:

$$\\hat\\epsilon = \\epsilon + \\Delta .$$

That error is made again at every step, and it is *not* harmless noise: it has a mean and a spread
that change with the step. **D²-DPM** (Zeng et al., AAAI 2025,
[arXiv 2501.08180]({PAPER_URL}), [official code]({CODE_URL})) models $\\Delta$ at each step and removes it
before the ordinary denoising step: a *dual* denoising.
"""

SECTIONS: list[tuple[str, str]] = [
    (
        "1. Two deviations, two symptoms",
        r"""
At each time step $t$ the paper models the quantization noise as Gaussian,
$\Delta \sim \mathcal N(\mu_\Delta(t), \sigma_\Delta(t)^2)$. The two moments do different damage:

- the **mean deviation** $\mu_\Delta(t)$ pushes every step in the same direction: the whole trajectory
  drifts (on images: shifted colours and brightness, wrong shapes);
- the **variance deviation** $\sigma_\Delta(t)$ adds extra randomness at every step
  (on images: grain, lost detail, samples that scatter off the data).
""",
    ),
    (
        "2. What the backbone removes first: each layer's mean error",
        r"""
Quantizing a network's weights and inputs moves each layer's output by an error with a **mean per output channel**
that changes with the step but hardly with the sample. Round to nearest leaves it in place, and deterministic DDIM adds
it up over every step: on the emoji model (guidance 3) a constant offset of 0.01 in $\epsilon$ at every step costs 12.9 dB
of PSNR to full precision, where white noise of three times that size costs only 40 dB.
A standard post-training quantization (PTQ) *backbone* removes this mean error once, offline, layer by layer:
bias correction subtracts each layer's mean output error at each calibrated step; AdaRound first learns whether each
weight rounds up or down. The **PTQ backbone** control chooses it (`rtn` keeps the error, to show what the backbone is for).

What is left is the **per-step deviation** of $\hat\epsilon$ that D²-DPM and PTQD model: the part of the error that
depends on the sample (its spread $\sigma_\Delta(t)$, its correlation $\rho$ with $\hat\epsilon$) and the mean
$\mu_\Delta(t)$ that the network's nonlinear layers make of the per-layer noise. So read the Deviation curves with the
backbone in mind: after `rtn`, $\mu_\Delta$ is mostly the layers' own mean error and every mean correction removes much
of it; after a backbone it is what remains, and the corrections help only as far as that remainder is the Gaussian of
the next section. On the emoji model (512 images, η = 0) the best correction adds 1.0 dB of PSNR to FP to the AdaRound
network at W8A8 and 0.2 dB at W4A8; after `rtn` it adds 6.7 dB at W8A8 (PTQD) and 7.9 dB at W4A8.
""",
    ),
    (
        "3. The noise model: a joint Gaussian of $(\\hat\\epsilon, \\Delta)$ per step",
        r"""
We can see the quantized output $\hat\epsilon$ at inference, but not $\Delta$. D²-DPM models the two together,
one bivariate Gaussian per step (or per step and channel), fitted on calibration runs where both networks see the same $x_t$:

$$\begin{pmatrix}\hat\epsilon\\ \Delta\end{pmatrix} \sim \mathcal N\!\left(\begin{pmatrix}\mu_{\hat\epsilon}\\ \mu_\Delta\end{pmatrix},
\begin{pmatrix}\sigma_{\hat\epsilon}^2 & \rho\,\sigma_{\hat\epsilon}\sigma_\Delta\\ \rho\,\sigma_{\hat\epsilon}\sigma_\Delta & \sigma_\Delta^2\end{pmatrix}\right).$$

Given what we observe, the noise is predictable in part:

$$\mu_{\text{cond}}(\hat\epsilon) = \mu_\Delta + \rho\,\frac{\sigma_\Delta}{\sigma_{\hat\epsilon}}\,(\hat\epsilon - \mu_{\hat\epsilon}),
\qquad \sigma_{\text{cond}} = \sigma_\Delta\sqrt{1-\rho^2}.$$

The **Deviation curves** view plots $\mu_\Delta$, $\sigma_\Delta$, $\rho$ and $\sigma_{\text{cond}}$ per step, and the paper's
Figure 2: the histogram of $\Delta$ and the joint density with the line $\mu_{\text{cond}}(\hat\epsilon)$.
""",
    ),
    (
        "4. The DDIM step",
        r"""
With $\bar\alpha_t$ the cumulative noise schedule and $\eta \in [0, 1]$ ($\eta = 0$: deterministic DDIM; $\eta = 1$: DDPM-like),

$$\sigma_t = \eta\,\sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}}\,\sqrt{1-\frac{\bar\alpha_t}{\bar\alpha_{t-1}}},$$

$$x_{t-1} = \sqrt{\bar\alpha_{t-1}}\,\frac{x_t - \sqrt{1-\bar\alpha_t}\,E}{\sqrt{\bar\alpha_t}} + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,E + \sigma_t z,
\qquad z \sim \mathcal N(0, I).$$

An error in the noise estimate $E$ reaches $x_{t-1}$ multiplied by

$$k_t = \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2} - \sqrt{\frac{\bar\alpha_{t-1}(1-\bar\alpha_t)}{\bar\alpha_t}} .$$
""",
    ),
    (
        "5. S-D²: stochastic dual denoising",
        r"""
Subtract a *sample* of the conditional noise model, then take the unchanged step:

$$E' = \hat\epsilon - \mu_{\text{cond}}(\hat\epsilon) - \sigma_{\text{cond}}\,z', \qquad z' \sim \mathcal N(0, I).$$

It works at any $\eta$; at $\eta = 0$ it turns DDIM into a mildly stochastic sampler.
""",
    ),
    (
        "6. D-D²: deterministic dual denoising",
        r"""
Subtract the conditional *mean*, and let the step's own noise absorb the residual variance:

$$E' = \hat\epsilon - \mu_{\text{cond}}(\hat\epsilon), \qquad
\sigma_t' = \begin{cases}\sqrt{\sigma_t^2 - k_t^2\,\sigma_{\text{cond}}^2} & \text{if } k_t^2\sigma_{\text{cond}}^2 < \sigma_t^2\\ 0 & \text{otherwise.}\end{cases}$$

At $\eta = 0$ there is no step noise ($\sigma_t = 0$) to absorb anything into, so D-D² is mean correction only:
the grey bands of the Deviation curves mark those steps.
""",
    ),
    (
        "7. The baseline PTQD and the oracle",
        rf"""
[PTQD]({PTQD_URL}) (He et al., NeurIPS 2023) regresses $\Delta$ on the *full-precision* output, $\Delta \approx k\,\epsilon + b$
with $k \ge 0$, and corrects $E' = (\hat\epsilon - b)/(1 + k)$, absorbing the residual variance like D-D².
Its regressor cannot be observed at inference and it forbids negative correlation; D²-DPM conditions on $\hat\epsilon$ itself.

The **oracle** row (a teaching aid, not in the paper) subtracts the true $\Delta$, found by running the full-precision network too:
$E' = \hat\epsilon - \Delta = \epsilon$. It is the best any correction of the noise estimate can do.
""",
    ),
    (
        "8. What you are looking at",
        r"""
- **Compare**: every row starts from the *same* noise and uses the same per-step noise $z$, so differences come only from the
  network and the correction. Under each corrected row, a heat-map of $|x - x_{\text{FP}}|$: white means "same as full precision".
  PSNR to FP measures closeness to what the full-precision model would have drawn, not image quality in general.
- **Efficiency**: model size counts each quantized weight at its bit-width; BOPs are $2\cdot\text{MACs}\cdot b_w b_a$ per layer
  (full precision counts $32\times32$).
- **Trajectories**: RMSE of each method's $x_t$ to the FP trajectory at every step, and each method's predicted $x_0$.
""",
    ),
]

PREDICT_PROMPT = """
### Predict, then toggle

Before each run, write down what you expect; then run it and compare.

1. Run **W4A8, η = 0** with every correction on. Which row is closest to FP? Now switch **variance correction off**:
   does D-D² change? (Hint: look at $\\sigma_t$ at $\\eta = 0$ on the Deviation curves.)
2. Set **η = 1**. Predict: does the gap between S-D² and D-D² grow or shrink? Where are the grey bands now?
3. Go from **W8A8 to W4A6**. Which deviation grows more, $\\mu_\\Delta$ or $\\sigma_\\Delta$? Which artefact do you expect to see first:
   a colour shift or grain?
4. Switch **mean correction off** and leave the variance on. Is that better or worse than PTQD? (The paper's Table 5 says
   mean-only beats PTQD; mean + variance is best.)
5. Add the **oracle** row. How much of the distance to FP do the D² corrections recover? What is left, and why can no
   correction of $\\epsilon$ remove it?
"""

REFERENCES = f"""
### What we measured on these models

For every backbone (the repository's `docs/results.md`): the **mean** correction does nearly all the repair, as long as
the backbone leaves a mean deviation (round to nearest: up to 7.9 dB on emoji; after the per-step bias correction or AdaRound
at most 1.9 dB on emoji, often none); conditioning on $\\hat\\epsilon$ beats PTQD where the error is correlated with the output (toy2d with
round to nearest or bias correction at W4: $\\rho \\approx -0.85$, D² removes 54–64 % of the excess NLL and PTQD none; AdaRound takes
that correlation away; on Fashion-MNIST after bias correction at W4, where it is anti-correlated, D-D² gains 2.5 dB at η = 0
and PTQD nothing); after AdaRound, where it is weak on both image models, D-D² and PTQD are within 0.3 dB of each other at
W8A8 and W4A8, and PTQD is ahead at emoji W4A6.
The **variance** half of D-D² never helped: the mean-corrected output $E' = \\mathbb{{E}}[\\epsilon \\mid \\hat\\epsilon]$ already has
*less* variance than $\\epsilon$ (by $\\sigma_{{\\text{{cond}}}}^2$ for any joint Gaussian), so absorbing more noise moves away from FP.

### Read more

- Q. Zeng, J. Song, H. Zheng, H. Jiang, M. Song. *D²-DPM: Dual Denoising for Quantized Diffusion Probabilistic Models.*
  AAAI 2025. [arXiv 2501.08180]({PAPER_URL}) · [code: TaylorJocelyn/D2-DPM]({CODE_URL})
- Y. He et al. *PTQD: Accurate Post-Training Quantization for Diffusion Models.* NeurIPS 2023. [arXiv 2305.10657]({PTQD_URL})
- J. Song, C. Meng, S. Ermon. *Denoising Diffusion Implicit Models.* ICLR 2021 (the DDIM step and η).

Differences from the paper in this demo: small models trained here instead of LDM-4 ImageNet; a choice of PTQ
backbone (plain rounding, per-layer bias correction, or AdaRound's learned rounding) instead of BRECQ with AdaRound;
the backbone removes each layer's mean quantization error (per step) before sampling, and D²-DPM and PTQD model the deviation left in ε̂ at each step;
the conditional mean $\\mu_{{\\text{{cond}}}}(\\hat\\epsilon)$ of the paper's
Algorithm 1 and code (not the unconditional $\\mu_\\Delta$ of its Eq. 15).
"""


def method_page_markdown() -> str:
    """The whole Method page as one Markdown string (both UIs render it)."""
    parts = [INTRO]
    for title, body in SECTIONS:
        parts.append(f"#### {title}\n{body}")
    parts.append(PREDICT_PROMPT)
    parts.append(REFERENCES)
    return "\n".join(parts)


def method_page_blocks() -> list[tuple[str, str]]:
    """The Method page as ("markdown", text) and ("latex", equation) blocks, for UIs whose Markdown
    renders inline math but not multi-line display math (Streamlit: st.markdown + st.latex)."""
    import re

    blocks: list[tuple[str, str]] = []
    for index, part in enumerate(re.split(r"\$\$(.+?)\$\$", method_page_markdown(), flags=re.DOTALL)):
        part = part.strip()
        if part:
            blocks.append(("latex" if index % 2 else "markdown", part))
    return blocks
