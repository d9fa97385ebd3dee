"""The Gradio app: four tabs (Compare, Deviation curves, Trajectories, Method) over one comparison.

Every event has an `api_name`, so `gradio_client` can drive the whole flow:
`/model_info`, `/preset`, `/bits`, `/rows_note`, `/validate`, `/compare` (streams predicted x₀, then the
results; an identical configuration returns from the cache of finished runs), `/views`,
`/deviation_step`, `/trajectory_step`, `/particles`. Bad input raises `gr.Error` with the core's message.
Before any run the Compare tab shows the shipped example (`assets/example`, see d2dpm_app.story).
"""

from __future__ import annotations

import inspect
import logging
import time

import gradio as gr

from d2dpm import figures, teaching
from d2dpm.experiment import ComparisonResult, CompareProgress
from d2dpm.methods import METHODS

from . import common, story

log = logging.getLogger(__name__)

CACHE_SECONDS = 600  # how long Gradio keeps a run's files in its cache
MAX_UPLOAD = "64kb"

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]

CSS = """
.gradio-container {max-width: min(1400px, 100vw) !important; min-width: 0 !important; margin: auto;}  /* never wider than the screen: as a flex item it grew to its widest image */
#title h1 {margin-bottom: 0.1em; font-size: 1.7em;}
#title p {color: var(--body-text-color-subdued); margin-top: 0;}
#run-button {font-size: 1.1em;}
/* The grid PNG is drawn at its own pixel size and only ever scaled down here: smooth scaling keeps
   its text labels legible (pixelated downscaling dropped strokes from them). */
#samples img, #x0-step img {image-rendering: auto; max-width: 100%; height: auto; object-fit: contain;}
/* The image's fullscreen/download buttons float at its top right: a strip above the picture keeps them off
   the grid's title line (on a narrow screen the title reaches the right edge). */
#samples .image-container, #x0-step .image-container {padding-top: 34px;}
.method-chip {display: inline-block; padding: 1px 8px; margin: 2px 4px 2px 0; border-radius: 10px; color: white; font-size: 0.85em;}
.prompt {padding: 12px 16px; border-radius: 8px; background: var(--block-background-fill); border: 1px dashed var(--border-color-primary);}
footer {display: none !important;}
/* Phones: one column, nothing wider than the screen (tables scroll inside their own box). Gradio
   prefixes the selectors inside a media query with its container, so they name inner elements only. */
@media (max-width: 700px) {
  .column {flex: 1 1 100% !important; min-width: 100% !important; max-width: 100% !important;}
  .block {min-width: 0 !important; max-width: 100% !important;}
  #title h1 {font-size: 1.3em;}
  /* Phone reading order: the story (title, interpretation), the example grid, then the settings with Run,
     then the table, downloads and guide. The results column dissolves into the row so its parts can be
     ordered around the settings column. */
  #compare-row {flex-direction: column !important; flex-wrap: nowrap !important;}
  #results {display: contents !important;}
  #summary {order: 1;} #samples-caption {order: 2;} #samples {order: 3;} #controls {order: 4;}
  #metrics {order: 5;} #psnr-plot {order: 6;} #downloads {order: 7;} #guide {order: 8;} #chips {order: 9;}
  #hist-plot, #joint-plot {min-width: 100% !important;}  /* Figure 2's two plots one above the other */
  #metrics, #metrics .table-wrap {max-width: 100%; overflow-x: auto;}
  .js-plotly-plot, .plot-container {max-width: 100% !important;}
}
"""


def theme():
    # System fonts only: a Space visitor's browser may fetch web fonts, but the tests run offline.
    # Font objects, not strings: Gradio compares themes font by font, and Font.__eq__ fails on a str.
    fonts = [gr.themes.Font(name) for name in ("Inter", "DejaVu Sans", "ui-sans-serif", "sans-serif")]
    mono = [gr.themes.Font(name) for name in ("DejaVu Sans Mono", "ui-monospace", "monospace")]
    return gr.themes.Soft(primary_hue="blue", secondary_hue="orange", neutral_hue="slate", font=fonts, font_mono=mono)


def _chips() -> str:
    return " ".join(f'<span class="method-chip" style="background:{m.colour}">{m.label}</span>' for m in METHODS.values())


# -- event handlers (plain functions: the tests call them too)

def model_info(spec: str):
    """Model box changed: say what the model is; show guidance and class only for conditional models."""
    summary = common.describe_model(spec)
    message = summary.message if summary.ok else f"⚠️ {summary.message}"
    choices = summary.class_choices() if summary.conditional else [common.ALL_CLASSES]
    count = common.sample_count(summary)
    return (
        message,
        gr.Slider(visible=summary.conditional),
        gr.Dropdown(choices=choices, value=common.ALL_CLASSES, visible=summary.conditional),
        gr.Slider(maximum=count.maximum, value=count.default, label=count.label),
    )


def preset_bits(preset: str):
    """Preset chosen: set the bit sliders (a 'custom' choice leaves them as they are)."""
    if preset in common.PRESETS:
        w, a = common.PRESETS[preset]
        return gr.Slider(value=w), gr.Slider(value=a)
    return gr.Slider(), gr.Slider()


def bits_preset(w_bits, a_bits):
    """A bit slider moved: the preset radio names the preset these bits are, or 'custom' (it never goes stale)."""
    return gr.Radio(value=common.preset_for_bits(w_bits, a_bits))


def rows_note(mean, variance, modes):
    note = common.rows_note(bool(mean), bool(variance), modes or [])
    return gr.Markdown(value=f"ⓘ {note}" if note else "", visible=bool(note))


def _visitor_error(error: BaseException) -> gr.Error:
    title, message = common.visitor_message(error)
    return gr.Error(message, title=title, duration=8)


def controls_event(handler):
    """`handler(controls, ...)` as a Gradio event over the settings widgets. Gradio hands their values
    over one by one, in `Controls.widget_names()` order (which names the API's parameters), then a
    gr.Progress when the handler takes `progress`; the handler gets them as one `common.Controls`."""
    names = common.Controls.widget_names()
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
    if "progress" in inspect.signature(handler).parameters:
        parameters.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))

    if inspect.isgeneratorfunction(handler):  # Gradio streams the outputs of generator functions only
        def event(*values):
            yield from handler(common.Controls.from_widgets(*values[:len(names)]), *values[len(names):])
    else:
        def event(*values):
            return handler(common.Controls.from_widgets(*values[:len(names)]), *values[len(names):])
    event.__signature__ = inspect.Signature(parameters)
    event.__name__, event.__doc__ = handler.__name__, handler.__doc__
    return event


def validate(controls: common.Controls) -> None:
    """Check the settings before a run, with no outputs: a bad setting shows a message and leaves the
    previous results on screen (an error inside the run itself would mark every output as failed)."""
    try:
        common.plan_run(controls)
    except Exception as error:
        raise _visitor_error(error) from None


# Finished comparisons, shared by every visitor of this server: an identical run returns at once. A visitor's
# session (gr.State) keeps only the key of its latest result, so however many sessions there are, results
# take at most what this store holds (common.MAX_STORED_RESULTS, MAX_STORED_RESULTS_MB).
RESULTS = common.ResultStore()
DROPPED = ("This comparison is no longer in the server's memory (other visitors' runs replaced it). "
           "Press Run comparison to run it again.")


def stored_result(state) -> ComparisonResult | None:
    """The visitor's latest result from the key its session keeps (None before any run)."""
    if state is None or isinstance(state, ComparisonResult):
        return state
    result = RESULTS.get(state)
    if result is None:
        raise gr.Error(DROPPED)
    return result


def _final_outputs(result: ComparisonResult, seconds: float, cached: bool, folder, key):
    files = [str(p) for p in common.write_downloads(result, folder)]
    return (common.final_grid(result), common.summary_markdown(result, seconds, cached=cached),
            common.metrics_display(result.metrics, result.model.kind), files, key)


def run_compare(controls: common.Controls, progress=gr.Progress()):
    """Stream the calibration's progress and the predicted x₀ of every method after each step, then the
    results (at once when the same configuration ran before on this server).

    Outputs: samples image, summary markdown, metrics table, downloads, state (the key of the result in
    RESULTS, not the result: sessions hold no results of their own). Stopping the event
    (the Stop button, or a visitor who leaves) closes this generator, which stops the run at its next step.
    """
    folder = None
    stream = None
    try:
        plan = common.plan_run(controls)
        start = time.perf_counter()
        cached = RESULTS.get(plan.config)
        if cached is not None:
            folder = common.new_request_folder()  # Gradio copies the files into its cache; ours go when the event ends
            yield _final_outputs(cached, time.perf_counter() - start, True, folder, plan.config)
            return
        kind = common.describe_model(plan.config.model).kind
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
        RESULTS.put(plan.config, result)
        folder = common.new_request_folder()
        yield _final_outputs(result, time.perf_counter() - start, False, folder, plan.config)
    except gr.Error:
        raise
    except Exception as error:  # keep serving: one line for the visitor, the trace in the operator's log
        raise _visitor_error(error) from None
    finally:
        if stream is not None:
            stream.close()
        common.remove_request_folder(folder)


VIEW_COUNT = 17


def refresh_views(state, all_paths: bool = False):
    """After a run: the Deviation curves and Trajectories tabs (figures, sliders, step views), their
    'no comparison yet' prompts hidden, the PSNR (or, for points, MSE) chart and the samples caption."""
    result = stored_result(state)
    if result is None:
        return (gr.skip(),) * VIEW_COUNT
    steps = len(result.records)
    mid = steps // 2
    last = steps - 1
    points = result.model.kind == "points"
    title = common.run_title(result)
    return (
        figures.deviation_figure(result.stats_table, title=f"Per-step quantization noise: {title}"),
        gr.Slider(minimum=1, maximum=steps, value=mid + 1, step=1, interactive=True),
        figures.delta_histogram_figure(result.stats, mid),
        figures.joint_density_figure(result.stats, mid),
        common.stats_caption(result, mid),
        figures.trajectory_figure(result.trajectory, title=f"Distance to the full-precision trajectory: {title}"),
        figures.moments_figure(result.trajectory),
        gr.Slider(minimum=1, maximum=steps, value=steps, step=1, interactive=True),
        common.step_grid(result, last),
        common.step_caption(result, last),
        gr.Plot(value=figures.particles_figure(result, paths=None if all_paths else figures.HIGHLIGHTED_PATHS) if points else None,
                visible=points),
        gr.Plot(value=figures.metrics_figure(result.metrics, result.model.kind), visible=True),
        gr.Column(visible=False),  # the Deviation curves prompt
        gr.Column(visible=True),  # the Deviation curves views
        gr.Column(visible=False),  # the Trajectories prompt
        gr.Column(visible=True),  # the Trajectories views
        gr.Checkbox(visible=points),  # toy2d: every trajectory
    )


def _step_index(result: ComparisonResult, step) -> int:
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise gr.Error(f"Step: got {step!r}; allowed: a whole number from 1 to {len(result.records)}") from None
    if not 1 <= step <= len(result.records):
        raise gr.Error(f"Step: got {step}; allowed: a whole number from 1 to {len(result.records)}")
    return step - 1


# A new run closes the messages of earlier ones (they piled up while their 8 s ran).
CLEAR_TOASTS_JS = "() => { document.querySelectorAll('.toast-close').forEach(button => button.click()); }"
# On a phone the settings (and Run) come after the grid: after Run, show the grid, where the run streams in.
SHOW_GRID_JS = ("() => { document.querySelectorAll('.toast-close').forEach(button => button.click()); "
                "if (window.innerWidth <= 700) document.querySelector('#samples')?.scrollIntoView({block: 'start'}); }")
RESIZE_JS = "() => { for (const wait of [50, 300]) setTimeout(() => window.dispatchEvent(new Event('resize')), wait); }"

NO_RUN = "Run a comparison first (Compare tab)."


def deviation_step(state, step):
    result = stored_result(state)
    if result is None:
        raise gr.Error(NO_RUN)
    index = _step_index(result, step)
    return figures.delta_histogram_figure(result.stats, index), figures.joint_density_figure(result.stats, index), common.stats_caption(result, index)


def trajectory_step(state, step):
    result = stored_result(state)
    if result is None:
        raise gr.Error(NO_RUN)
    index = _step_index(result, step)
    return common.step_grid(result, index), common.step_caption(result, index)


def particles(state, all_paths: bool):
    """toy2d: redraw the particles with a handful of highlighted trajectories, or all of them."""
    result = stored_result(state)
    if result is None or result.model.kind != "points":
        return gr.skip()
    return figures.particles_figure(result, paths=None if all_paths else figures.HIGHLIGHTED_PATHS)


def samples_caption(model: str):
    return common.samples_caption(common.describe_model(model).kind)


# -- layout

PROMPT = common.PROMPT


def _landing():
    """What the Compare tab shows before any click: the shipped example and its interpretation."""
    example = story.load_example()
    if example is None:
        return None, ("Press **Run comparison**. Every row starts from the same noise. (No precomputed example is installed: "
                      "`python scripts/make_example.py` makes one.)"), common.metrics_display(None)
    try:
        default = common.build_config(common.Controls())
    except Exception:  # no default run possible (e.g. its statistics not ready): the note just names the example
        default = None
    text = f"{story.example_note(example, default)}  \n{example.text()}"
    return example.grid, text, common.metrics_display(example.metrics, example.numbers.get("kind", "image"))


def _view_intro(intro: str, view: str):
    """A view's intro and, until the first run, its prompt with a Run button (ids `<view>-prompt`, `<view>-run`)."""
    gr.Markdown(intro)
    with gr.Column(visible=True, elem_id=f"{view}-prompt") as prompt:
        gr.Markdown(PROMPT, elem_classes=["prompt"])
        run = gr.Button("Run comparison", variant="primary", elem_id=f"{view}-run")
    return prompt, run


def build_demo() -> gr.Blocks:
    # No usage analytics: the app sends nothing anywhere (and must run with no network at all).
    grid0, summary0, metrics0 = _landing()
    defaults = common.Controls()
    # delete_cache: Gradio's copies of each run's images and downloads go after CACHE_SECONDS.
    with gr.Blocks(title="D²-DPM: quantized diffusion, repaired", analytics_enabled=False,
                   delete_cache=(CACHE_SECONDS // 4, CACHE_SECONDS)) as demo:
        state = gr.State(None)
        gr.Markdown(
            "# D²-DPM: what quantization does to diffusion sampling, and how dual denoising repairs it\n"
            "The same noise goes through a full-precision (FP) model, its few-bit quantized copy and each correction; "
            "the rows show where they part. "
            f"[Paper]({common.PAPER_URL}) · [official code]({common.CODE_URL})",
            elem_id="title",
        )
        with gr.Tabs():
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                with gr.Row(equal_height=False, elem_id="compare-row"):
                    with gr.Column(scale=1, min_width=300, elem_id="controls"):
                        model = gr.Dropdown(common.MODEL_CHOICES, value=common.DEFAULT_MODEL, allow_custom_value=True, label="Model",
                                            info="emoji, fashion, toy2d, or a diffusers model folder / hub id", elem_id="model")
                        model_msg = gr.Markdown(elem_id="model-info")
                        with gr.Row():
                            run = gr.Button("Run comparison", variant="primary", elem_id="run-button", scale=3)
                            stop = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1)
                        with gr.Group():
                            preset = gr.Radio([*common.PRESETS, common.CUSTOM_PRESET], value=common.DEFAULT_PRESET, label="Bit-width preset",
                                              info="weights / activations; or move the sliders for any W2–8 / A4–8", elem_id="preset")
                            with gr.Row():
                                w_bits = gr.Slider(2, 8, value=defaults.w_bits, step=1, label="Weight bits", elem_id="w-bits")
                                a_bits = gr.Slider(4, 8, value=defaults.a_bits, step=1, label="Activation bits", elem_id="a-bits")
                            backbone = gr.Radio(common.BACKBONE_CHOICES, value=common.DEFAULT_BACKBONE, label="PTQ backbone",
                                                info=common.BACKBONE_INFO, elem_id="backbone")
                        with gr.Group():
                            with gr.Row():
                                steps = gr.Slider(1, common.MAX_UI_STEPS, value=defaults.steps, step=1, label="DDIM steps", elem_id="steps")
                                eta = gr.Slider(0, 1, value=defaults.eta, step=0.05, label="η", info="0 = deterministic DDIM, 1 = DDPM-like")
                            guidance = gr.Slider(0, 10, value=defaults.guidance, step=0.5, label="Guidance scale", visible=False,
                                                 info="classifier-free guidance")
                            class_choice = gr.Dropdown([common.ALL_CLASSES], value=defaults.class_choice, label="Class", visible=False)
                            with gr.Row():
                                seed = gr.Number(defaults.seed, precision=0, minimum=0, label="Seed")
                                count = common.sample_count(common.describe_model(common.DEFAULT_MODEL))
                                num_images = gr.Slider(1, count.maximum, value=count.default, step=1,
                                                       label="Images", elem_id="num-images")
                        with gr.Group():
                            gr.Markdown("**Corrections** (FP and the uncorrected quantized model are always shown)")
                            with gr.Row():
                                mean = gr.Checkbox(defaults.mean, label="Mean correction", info="subtract μ_cond(ε̂)")
                                variance = gr.Checkbox(defaults.variance, label="Variance correction", info="remove σ_cond")
                            modes = gr.CheckboxGroup(list(common.MODES), value=list(defaults.modes), label="Mode",
                                                     info="S-D²: subtract a noise draw · D-D²: absorb into σ_t'")
                            note = gr.Markdown(visible=False, elem_id="rows-note")
                            with gr.Row():  # one checkbox per extra row of the method registry (PTQD, the oracle)
                                rows = {m.name: gr.Checkbox(m.name in defaults.rows, label=m.ui_label, info=m.ui_hint or None)
                                        for m in common.ROW_METHODS}
                        with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                            calib_samples = gr.Slider(2, common.MAX_CALIB_SAMPLES, value=defaults.calib_samples, step=1, label="Calibration trajectories",
                                                      info="used when no shipped or cached statistics match", elem_id="calib-samples")
                            granularity = gr.Radio(common.GRANULARITY_CHOICES, value=defaults.granularity, label="Noise model granularity")
                            gr.Markdown(f"CPU budget: images × method rows × steps ≤ {common.MAX_IMAGE_STEPS}, "
                                        f"and with a calibration (trajectories × steps × 2) ≤ {common.MAX_WORK}.")
                    with gr.Column(scale=2, min_width=0, elem_id="results"):
                        samples_note = gr.Markdown("### Samples\n" + common.samples_caption("image"), elem_id="samples-caption")
                        summary = gr.Markdown(summary0, elem_id="summary")
                        samples = gr.Image(value=grid0, label="Samples", show_label=False, type="pil",
                                           format="png", interactive=False, elem_id="samples", buttons=["download", "fullscreen"])
                        metrics = gr.Dataframe(value=metrics0, label="Metrics (PSNR/MSE to the FP samples; efficiency: size, BOPs)", interactive=False,
                                               elem_id="metrics", wrap=True)
                        psnr_plot = gr.Plot(show_label=False, elem_id="psnr-plot", visible=False)
                        # Hidden until a run has written files: on the landing view it would be an empty box.
                        downloads = gr.File(label="Downloads: " + ", ".join(common.DOWNLOAD_NAMES), file_count="multiple",
                                            interactive=False, elem_id="downloads", height=140, visible=False)
                        gr.Markdown(common.GUIDE, elem_id="guide")
                        gr.Markdown("Colours used in every plot: " + _chips(), elem_id="chips")
            with gr.Tab("Deviation curves", id="deviation") as deviation_tab:
                dev_prompt, dev_run = _view_intro(common.DEVIATION_INTRO, "deviation")
                with gr.Column(visible=False) as dev_views:
                    deviation_plot = gr.Plot(label="Per-step noise model", show_label=False, elem_id="deviation-plot")
                    gr.Markdown("### The paper's Figure 2 on this model\nThe quantization noise at one step: is it Gaussian, "
                                "and how much of it can be predicted from the quantized output ε̂?")
                    dev_step = gr.Slider(1, 20, value=10, step=1, label="Step (1 = noisiest)", elem_id="dev-step")
                    dev_caption = gr.Markdown()
                    with gr.Row():
                        hist_plot = gr.Plot(label="Histogram of Δ with Gaussian fit", show_label=False, elem_id="hist-plot")
                        joint_plot = gr.Plot(label="Joint density of (ε̂, Δ) with the conditional mean", show_label=False, elem_id="joint-plot")
            with gr.Tab("Trajectories", id="trajectories") as trajectories_tab:
                traj_prompt, traj_run = _view_intro(common.TRAJECTORIES_INTRO, "trajectories")
                with gr.Column(visible=False) as traj_views:
                    particles_plot = gr.Plot(label="Particles over the data density (toy2d)", show_label=False, visible=False, elem_id="particles-plot")
                    all_paths = gr.Checkbox(False, label="toy2d: draw every trajectory (not only a handful)", elem_id="all-paths", visible=False)
                    traj_plot = gr.Plot(label="RMSE to FP", show_label=False, elem_id="traj-plot")
                    moments_plot = gr.Plot(label="Mean and std of x_t", show_label=False, elem_id="moments-plot")
                    traj_step = gr.Slider(1, 20, value=20, step=1, label="Step: predicted x₀ of every method (1 = noisiest)", elem_id="traj-step")
                    traj_caption = gr.Markdown()
                    x0_image = gr.Image(label="Predicted x₀ at the chosen step", show_label=False, type="pil", format="png", interactive=False, elem_id="x0-step")
            with gr.Tab("Method", id="method"):
                gr.Markdown(teaching.method_page_markdown(), latex_delimiters=LATEX, elem_id="method-text")

        # Plots drawn while their tab was hidden took a default width (half the page): a resize when the
        # tab is shown makes plotly fit them to it.
        for tab in (deviation_tab, trajectories_tab):
            tab.select(None, None, None, js=RESIZE_JS, queue=False)
        model.change(model_info, model, [model_msg, guidance, class_choice, num_images], api_name="model_info")
        model.change(samples_caption, model, samples_note, api_name="samples_caption", show_progress="hidden")
        demo.load(model_info, model, [model_msg, guidance, class_choice, num_images], api_name="model_info_on_load")
        # .input fires only for the visitor's own changes, so the preset and the sliders cannot chase each other.
        preset.input(preset_bits, preset, [w_bits, a_bits], api_name="preset")
        for slider in (w_bits, a_bits):
            slider.input(bits_preset, [w_bits, a_bits], preset, api_name="bits" if slider is w_bits else "bits_a", show_progress="hidden")
        for name, switch in (("rows_note", mean), ("rows_note_variance", variance), ("rows_note_modes", modes)):
            switch.change(rows_note, [mean, variance, modes], note, api_name=name, show_progress="hidden")
        widgets = dict(model=model, w_bits=w_bits, a_bits=a_bits, steps=steps, eta=eta, guidance=guidance, class_choice=class_choice,
                       seed=seed, num_images=num_images, mean=mean, variance=variance, modes=modes, **rows,
                       calib_samples=calib_samples, granularity=granularity, backbone=backbone)
        controls = [widgets[name] for name in common.Controls.widget_names()]
        view_outputs = [deviation_plot, dev_step, hist_plot, joint_plot, dev_caption, traj_plot, moments_plot,
                        traj_step, x0_image, traj_caption, particles_plot, psnr_plot, dev_prompt, dev_views, traj_prompt, traj_views, all_paths]
        compare_events = []
        for index, button in enumerate((run, dev_run, traj_run)):
            suffix = "" if index == 0 else f"_{index}"
            button.click(None, None, None, js=SHOW_GRID_JS if button is run else CLEAR_TOASTS_JS, queue=False)
            event = button.click(controls_event(validate), controls, None, api_name="validate" + suffix, show_progress="hidden").success(
                controls_event(run_compare), controls, [samples, summary, metrics, downloads, state], api_name="compare" + suffix,
                concurrency_limit=common.RUN_SLOTS, concurrency_id="compare", show_progress_on=[samples],
            )
            event.success(refresh_views, [state, all_paths], view_outputs, api_name="views" + suffix)
            event.success(lambda: gr.File(visible=True), None, downloads, api_name=False, queue=False)  # the files exist now
            compare_events.append(event)
        stop.click(None, None, None, cancels=compare_events, api_name=False)
        # Sliders answer every change, keyboard included, not only a mouse release; always_last drops stale requests.
        dev_step.input(deviation_step, [state, dev_step], [hist_plot, joint_plot, dev_caption], api_name="deviation_step",
                       trigger_mode="always_last", show_progress="hidden")
        traj_step.input(trajectory_step, [state, traj_step], [x0_image, traj_caption], api_name="trajectory_step",
                        trigger_mode="always_last", show_progress="hidden")
        all_paths.change(particles, [state, all_paths], particles_plot, api_name="particles")
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    demo = build_demo()
    demo.queue(default_concurrency_limit=2, max_size=32)
    # The app takes no uploads: refuse anything bigger than a form field at /gradio_api/upload.
    demo.launch(theme=theme(), css=CSS, show_error=True, max_file_size=MAX_UPLOAD)
