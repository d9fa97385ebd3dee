"""The Gradio app: four tabs (Compare, Deviation curves, Trajectories, Method) over one comparison.

Every event has an `api_name`, so `gradio_client` can drive the whole flow:
`/model_info`, `/preset`, `/validate`, `/compare` (streams predicted x₀, then the results), `/views`,
`/deviation_step`, `/trajectory_step`. Bad input raises `gr.Error` with the core's message.
"""

from __future__ import annotations

import logging
import time

import gradio as gr

from d2dpm import figures, teaching
from d2dpm.experiment import ComparisonResult, CompareProgress, default_workbench

from . import common

log = logging.getLogger(__name__)

CACHE_SECONDS = 600  # how long Gradio keeps a run's files in its cache
MAX_UPLOAD = "64kb"

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]

CSS = """
.gradio-container {max-width: 1400px !important; margin: auto;}
#title h1 {margin-bottom: 0.1em;}
#title p {color: var(--body-text-color-subdued); margin-top: 0;}
#run-button {font-size: 1.1em;}
#samples img {image-rendering: pixelated;}
#x0-step img {image-rendering: pixelated;}
.method-chip {display: inline-block; padding: 1px 8px; margin: 2px 4px 2px 0; border-radius: 10px; color: white; font-size: 0.85em;}
footer {display: none !important;}
"""


def theme():
    # System fonts only: a Space visitor's browser may fetch web fonts, but the tests run offline.
    # Font objects, not strings: Gradio compares themes font by font, and Font.__eq__ fails on a str.
    fonts = [gr.themes.Font(name) for name in ("Inter", "DejaVu Sans", "ui-sans-serif", "sans-serif")]
    mono = [gr.themes.Font(name) for name in ("DejaVu Sans Mono", "ui-monospace", "monospace")]
    return gr.themes.Soft(primary_hue="blue", secondary_hue="orange", neutral_hue="slate", font=fonts, font_mono=mono)


def _chips() -> str:
    main = ["fp", "q", "ptqd", "s-d2", "d-d2", "mean-only", "var-only", "oracle"]
    return " ".join(f'<span class="method-chip" style="background:{figures.method_color(m)}">{figures.method_label(m)}</span>' for m in main)


# -- event handlers (plain functions: the tests call them too)

def model_info(spec: str):
    """Model box changed: say what the model is; show guidance and class only for conditional models."""
    summary = common.describe_model(spec)
    message = summary.message if summary.ok else f"⚠️ {summary.message}"
    choices = summary.class_choices() if summary.conditional else [common.ALL_CLASSES]
    count = common.SAMPLE_COUNTS[summary.kind]
    return (
        message,
        gr.Slider(visible=summary.conditional),
        gr.Dropdown(choices=choices, value=common.ALL_CLASSES, visible=summary.conditional),
        gr.Slider(maximum=count.maximum, value=count.default, label=count.label),
    )


def preset_bits(preset: str):
    if preset in common.PRESETS:
        w, a = common.PRESETS[preset]
        return gr.Slider(value=w), gr.Slider(value=a)
    return gr.Slider(), gr.Slider()


def validate(model, w_bits, a_bits, steps, eta, guidance, class_choice, seed, num_images,
             mean, variance, modes, ptqd, oracle, calib_samples, granularity, backbone=None) -> None:
    """Check the settings before a run, with no outputs: a bad setting shows a message and leaves the
    previous results on screen (an error inside the run itself would mark every output as failed)."""
    try:
        common.plan_run(model, w_bits, a_bits, steps, eta, guidance, class_choice, seed, num_images,
                        mean, variance, modes, ptqd, oracle, calib_samples, granularity, backbone)
    except Exception as error:
        title, message = common.visitor_message(error)
        raise gr.Error(message, title=title) from None


def run_compare(model, w_bits, a_bits, steps, eta, guidance, class_choice, seed, num_images,
                mean, variance, modes, ptqd, oracle, calib_samples, granularity, backbone=None, progress=gr.Progress()):
    """Stream the calibration's progress and the predicted x₀ of every method after each step, then the results.

    Outputs: samples image, summary markdown, metrics table, downloads, state. Stopping the event
    (the Stop button, or a visitor who leaves) closes this generator, which stops the run at its next step.
    """
    folder = None
    stream = None
    try:
        plan = common.plan_run(model, w_bits, a_bits, steps, eta, guidance, class_choice, seed, num_images,
                               mean, variance, modes, ptqd, oracle, calib_samples, granularity, backbone)
        kind = common.describe_model(plan.config.model).kind
        start = time.perf_counter()
        result = None
        stream = common.stream_run(plan)
        for event in stream:
            if isinstance(event, common.Calibrating):
                progress(event.fraction, desc=f"calibrating the noise model: {event.message}")
                yield (gr.skip(), f"Calibrating the noise model… {event.message}", gr.skip(), gr.skip(), gr.skip())
            elif isinstance(event, CompareProgress):
                progress(event.step / event.total, desc=f"sampling: step {event.step}/{event.total}")
                yield (common.progress_grid(event.x0, kind, event.step, event.total),
                       f"Sampling… step {event.step} of {event.total}", gr.skip(), gr.skip(), gr.skip())
            else:
                result = event
        assert isinstance(result, ComparisonResult)
        seconds = time.perf_counter() - start
        folder = common.new_request_folder()  # Gradio copies the files into its cache; ours go when the event ends
        files = [str(p) for p in common.write_downloads(result, folder)]
        yield (common.final_grid(result), common.summary_markdown(result, seconds), common.metrics_display(result.metrics),
               files, result)
    except gr.Error:
        raise
    except Exception as error:  # keep serving: one line for the visitor, the trace in the operator's log
        title, message = common.visitor_message(error)
        raise gr.Error(message, title=title) from None
    finally:
        if stream is not None:
            stream.close()
        common.remove_request_folder(folder)


def refresh_views(result: ComparisonResult | None):
    """After a run: the Deviation curves and Trajectories tabs (figures, sliders, step views)."""
    if result is None:
        return (gr.skip(),) * 12
    steps = len(result.records)
    mid = steps // 2
    last = steps - 1
    points = result.model.kind == "points"
    return (
        figures.deviation_figure(result.stats_table, title=f"Per-step quantization noise: {common.run_title(result)}"),
        gr.Slider(minimum=1, maximum=steps, value=mid + 1, step=1, interactive=True),
        figures.delta_histogram_figure(result.stats, mid),
        figures.joint_density_figure(result.stats, mid),
        common.stats_caption(result, mid),
        figures.trajectory_figure(result.trajectory),
        figures.moments_figure(result.trajectory),
        gr.Slider(minimum=1, maximum=steps, value=steps, step=1, interactive=True),
        common.step_grid(result, last),
        common.step_caption(result, last),
        gr.Plot(value=figures.particles_figure(result) if points else None, visible=points),
        gr.Plot(value=figures.metrics_figure(result.metrics) if not points else None, visible=not points),
    )


def _step_index(result: ComparisonResult, step) -> int:
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise gr.Error(f"step: got {step!r}; allowed: an integer from 1 to {len(result.records)}") from None
    if not 1 <= step <= len(result.records):
        raise gr.Error(f"step: got {step}; allowed: an integer from 1 to {len(result.records)}")
    return step - 1


def deviation_step(result: ComparisonResult | None, step):
    if result is None:
        raise gr.Error("Run a comparison first (Compare tab).")
    index = _step_index(result, step)
    return figures.delta_histogram_figure(result.stats, index), figures.joint_density_figure(result.stats, index), common.stats_caption(result, index)


def trajectory_step(result: ComparisonResult | None, step):
    if result is None:
        raise gr.Error("Run a comparison first (Compare tab).")
    index = _step_index(result, step)
    return common.step_grid(result, index), common.step_caption(result, index)


# -- layout

def build_demo() -> gr.Blocks:
    # No usage analytics: the app sends nothing anywhere (and must run with no network at all).
    # delete_cache: Gradio's copies of each run's images and downloads go after CACHE_SECONDS.
    with gr.Blocks(title="D²-DPM: quantized diffusion, repaired", analytics_enabled=False,
                   delete_cache=(CACHE_SECONDS // 4, CACHE_SECONDS)) as demo:
        state = gr.State(None)
        gr.Markdown(
            "# D²-DPM: what quantization does to diffusion sampling, and how dual denoising repairs it\n"
            "Quantize a diffusion model's noise predictor to a few bits, sample from the *same* noise with full precision, "
            "the quantized model and each correction, and watch where the trajectories part. "
            f"[Paper]({common.PAPER_URL}) · [official code]({common.CODE_URL})",
            elem_id="title",
        )
        with gr.Tabs():
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=340):
                        model = gr.Dropdown(common.MODEL_CHOICES, value=common.DEFAULT_MODEL, allow_custom_value=True, label="Model",
                                            info="emoji, fashion, toy2d, or a diffusers model folder / hub id", elem_id="model")
                        model_msg = gr.Markdown(elem_id="model-info")
                        with gr.Group():
                            preset = gr.Radio(list(common.PRESETS), value=common.DEFAULT_PRESET, label="Bit-width preset",
                                              info="weights / activations; or set any W2–8 / A4–8 below")
                            with gr.Row():
                                w_bits = gr.Slider(2, 8, value=common.PRESETS[common.DEFAULT_PRESET][0], step=1, label="Weight bits")
                                a_bits = gr.Slider(4, 8, value=common.PRESETS[common.DEFAULT_PRESET][1], step=1, label="Activation bits")
                        with gr.Group():
                            with gr.Row():
                                steps = gr.Slider(1, common.MAX_UI_STEPS, value=20, step=1, label="DDIM steps", elem_id="steps")
                                eta = gr.Slider(0, 1, value=0.0, step=0.05, label="η", info="0 = deterministic DDIM, 1 = DDPM-like")
                            guidance = gr.Slider(0, 10, value=3.0, step=0.5, label="Guidance scale", visible=False,
                                                 info="classifier-free guidance")
                            class_choice = gr.Dropdown([common.ALL_CLASSES], value=common.ALL_CLASSES, label="Class", visible=False)
                            with gr.Row():
                                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                                num_images = gr.Slider(1, common.SAMPLE_COUNTS["image"].maximum, value=common.SAMPLE_COUNTS["image"].default, step=1,
                                                       label="Images", elem_id="num-images")
                        with gr.Group():
                            gr.Markdown("**Corrections** (FP and the uncorrected quantized model are always shown)")
                            with gr.Row():
                                mean = gr.Checkbox(True, label="Mean correction", info="subtract μ_cond(ε̂)")
                                variance = gr.Checkbox(True, label="Variance correction", info="remove σ_cond")
                            modes = gr.CheckboxGroup(list(common.MODES), value=list(common.MODES), label="Mode",
                                                     info="S-D²: subtract a noise draw · D-D²: absorb into σ_t'")
                            with gr.Row():
                                ptqd = gr.Checkbox(True, label="PTQD baseline row")
                                oracle = gr.Checkbox(False, label="Oracle row", info="subtracts the true Δ")
                        with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                            calib_samples = gr.Slider(2, common.MAX_CALIB_SAMPLES, value=common.DEFAULT_CALIB_SAMPLES, step=1, label="Calibration trajectories",
                                                      info="used when no shipped or cached statistics match", elem_id="calib-samples")
                            granularity = gr.Radio(["channel", "tensor"], value="channel", label="Noise model granularity")
                            backbone = gr.Radio(common.BACKBONE_CHOICES, value=common.DEFAULT_BACKBONE, label="PTQ backbone",
                                                info="AdaRound only where its statistics are ready; bias-correction calibrates in seconds",
                                                elem_id="backbone")
                            gr.Markdown(f"CPU budget: images × method rows × steps ≤ {common.MAX_IMAGE_STEPS}, "
                                        f"and with a calibration (trajectories × steps × 2) ≤ {common.MAX_WORK}.")
                        with gr.Row():
                            run = gr.Button("Run comparison", variant="primary", elem_id="run-button", scale=3)
                            stop = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1)
                    with gr.Column(scale=2):
                        gr.Markdown("### Samples\nRows: FP | quantized | corrections, all from the same noise. "
                                    "Under each row, the heat-map of |x − FP| (white = identical to full precision).")
                        samples = gr.Image(label="Samples", show_label=False, type="pil",
                                           format="png", interactive=False, elem_id="samples", buttons=["download", "fullscreen"])
                        summary = gr.Markdown("Press **Run comparison**. Every row starts from the same noise.", elem_id="summary")
                        metrics = gr.Dataframe(value=common.metrics_display(None), label="Metrics (PSNR/MSE to the FP samples; efficiency: size, BOPs)", interactive=False,
                                               elem_id="metrics", wrap=True)
                        psnr_plot = gr.Plot(show_label=False, elem_id="psnr-plot")
                        downloads = gr.File(label="Downloads: grid PNG, per-step CSVs, run.json", file_count="multiple",
                                            interactive=False, elem_id="downloads", height=140)
                        gr.Markdown("Colours used in every plot: " + _chips())
            with gr.Tab("Deviation curves", id="deviation"):
                gr.Markdown("How big is the quantization noise Δ at each step, how correlated with what the quantized model outputs, "
                            "and how much of it D-D² can absorb (grey: steps where it cannot, all of them at η = 0).")
                deviation_plot = gr.Plot(label="Per-step noise model", show_label=False, elem_id="deviation-plot")
                gr.Markdown("### The paper's Figure 2 on this model\nThe quantization noise at one step: is it Gaussian, "
                            "and how much of it can be predicted from the quantized output ε̂?")
                dev_step = gr.Slider(1, 20, value=10, step=1, label="Step (1 = noisiest)", elem_id="dev-step")
                dev_caption = gr.Markdown()
                with gr.Row():
                    hist_plot = gr.Plot(label="Histogram of Δ with Gaussian fit", show_label=False, elem_id="hist-plot")
                    joint_plot = gr.Plot(label="Joint density of (ε̂, Δ) with the conditional mean", show_label=False, elem_id="joint-plot")
            with gr.Tab("Trajectories", id="trajectories"):
                gr.Markdown("Distance of each method's sampling trajectory to the full-precision one, step by step.")
                traj_plot = gr.Plot(label="RMSE to FP", show_label=False, elem_id="traj-plot")
                moments_plot = gr.Plot(label="Mean and std of x_t", show_label=False, elem_id="moments-plot")
                particles_plot = gr.Plot(label="Particles over the data density (toy2d)", show_label=False, visible=False, elem_id="particles-plot")
                traj_step = gr.Slider(1, 20, value=20, step=1, label="Step: predicted x₀ of every method (1 = noisiest)", elem_id="traj-step")
                traj_caption = gr.Markdown()
                x0_image = gr.Image(label="Predicted x₀ at the chosen step", show_label=False, type="pil", format="png", interactive=False, elem_id="x0-step")
            with gr.Tab("Method", id="method"):
                gr.Markdown(teaching.method_page_markdown(), latex_delimiters=LATEX, elem_id="method-text")

        model.change(model_info, model, [model_msg, guidance, class_choice, num_images], api_name="model_info")
        demo.load(model_info, model, [model_msg, guidance, class_choice, num_images], api_name="model_info_on_load")
        preset.change(preset_bits, preset, [w_bits, a_bits], api_name="preset")
        controls = [model, w_bits, a_bits, steps, eta, guidance, class_choice, seed, num_images,
                    mean, variance, modes, ptqd, oracle, calib_samples, granularity, backbone]
        view_outputs = [deviation_plot, dev_step, hist_plot, joint_plot, dev_caption, traj_plot, moments_plot,
                        traj_step, x0_image, traj_caption, particles_plot, psnr_plot]
        compare_event = run.click(validate, controls, None, api_name="validate", show_progress="hidden").success(
            run_compare, controls, [samples, summary, metrics, downloads, state], api_name="compare",
            concurrency_limit=common.RUN_SLOTS, show_progress_on=[samples],
        )
        compare_event.success(refresh_views, state, view_outputs, api_name="views")
        stop.click(None, None, None, cancels=[compare_event], api_name=False)
        dev_step.release(deviation_step, [state, dev_step], [hist_plot, joint_plot, dev_caption], api_name="deviation_step")
        traj_step.release(trajectory_step, [state, traj_step], [x0_image, traj_caption], api_name="trajectory_step")
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    demo = build_demo()
    demo.queue(default_concurrency_limit=2, max_size=32)
    # The app takes no uploads: refuse anything bigger than a form field at /gradio_api/upload.
    demo.launch(theme=theme(), css=CSS, show_error=True, max_file_size=MAX_UPLOAD)
