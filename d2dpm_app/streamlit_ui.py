"""The Streamlit app: the Compare page (home) and the helpers the pages in views/ share.

`streamlit run app.py` calls `run_app()`, which declares the navigation (Compare, Deviation
curves, Trajectories, Method). The latest comparison lives in `st.session_state["result"]`;
finished comparisons are kept in a small store shared by all visitors (`st.cache_resource`),
keyed by the full configuration, so a repeated setting is instant.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from d2dpm import figures, teaching
from d2dpm.experiment import CompareConfig, ComparisonResult, CompareProgress

from . import common, story

ROOT = Path(__file__).resolve().parent.parent
# Not pages/: Streamlit would also take that folder's files for pages of its own, and a direct link to a
# view (…/method) would open with "Page not found".
PAGES = ROOT / "views"
RESULT_KEY = "result"
CONFIG_KEY = "config"
STORE_SIZE = 16
# How often a run that reports nothing (waiting for a slot, a silent part of a calibration) still touches
# the page: Streamlit's stop takes effect only when the script updates the page.
STOP_CHECK_SECONDS = 0.5
OTHER_MODEL = "other: a folder or hub id…"


def run_app() -> None:
    """Entry point of `streamlit run app.py`: page config, navigation, the chosen page."""
    st.set_page_config(page_title="D²-DPM demo", page_icon="🎛️", layout="wide")
    # Material icons ship with Streamlit's own frontend; emoji icons drew as empty boxes where the
    # visitor's machine has no colour-emoji font (seen in headless Chromium).
    navigation = st.navigation(
        [
            st.Page(str(PAGES / "0_Compare.py"), title="Compare", icon=":material/compare:", default=True, url_path="compare"),
            st.Page(str(PAGES / "1_Deviation_curves.py"), title="Deviation curves", icon=":material/show_chart:", url_path="deviation"),
            st.Page(str(PAGES / "2_Trajectories.py"), title="Trajectories", icon=":material/timeline:", url_path="trajectories"),
            st.Page(str(PAGES / "3_Method.py"), title="Method", icon=":material/functions:", url_path="method"),
        ]
    )
    navigation.run()


# -- shared store of finished comparisons (results are read-only once made)

@st.cache_resource(show_spinner=False)
def result_store() -> common.ResultStore:
    return common.ResultStore(STORE_SIZE)


def run_comparison(config: CompareConfig | common.Plan, image_slot=None, kind: str = "image") -> ComparisonResult:
    """Run (or fetch from the store) one comparison, streaming the predicted x₀ into `image_slot`
    and showing calibration and sampling progress. Raises ConfigError on bad input, Busy when the
    server's slots are taken. The visitor's Stop (or a rerun) raises inside a progress update here,
    which closes the run's stream and so stops the run at its next step; the bar is touched at least
    every STOP_CHECK_SECONDS, so a Stop is noticed while the run waits or works silently too."""
    plan = config if isinstance(config, common.Plan) else common.plan_config(config)
    store = result_store()
    cached = store.get(plan.config)
    if cached is not None:
        return cached
    bar = st.progress(0.0, text="starting…")
    result = None
    shown = (0.0, "starting…")
    stream = common.stream_run(plan, heartbeat=STOP_CHECK_SECONDS)
    try:
        for event in stream:
            if isinstance(event, common.Waiting):  # nothing new: the same bar again, where a Stop raises
                bar.progress(shown[0], text=shown[1] if shown[1] != "starting…" else event.message)
            elif isinstance(event, common.Calibrating):
                shown = (min(max(event.fraction, 0.0), 1.0), f"calibrating the noise model: {event.message}")
                bar.progress(shown[0], text=shown[1])
            elif isinstance(event, CompareProgress):
                shown = (event.step / event.total, f"sampling: step {event.step}/{event.total}")
                bar.progress(shown[0], text=shown[1])
                if image_slot is not None:
                    image_slot.image(common.progress_grid(event.x0, kind, event.step, event.total))
            else:
                result = event
    finally:
        stream.close()
        bar.empty()
    store.put(plan.config, result)
    return result


def current_result() -> ComparisonResult | None:
    return st.session_state.get(RESULT_KEY)


def result_or_prompt() -> ComparisonResult | None:
    """The latest comparison; else an invitation to run one (here, with the last settings or the defaults)."""
    result = current_result()
    if result is not None:
        return result
    st.info(common.PROMPT)
    if st.button("Run comparison", type="primary", key="run_default", help="the last settings of the Compare page, or the defaults"):
        config = st.session_state.get(CONFIG_KEY) or default_config()
        if config is None:
            return None
        try:
            kind = common.describe_model(config.model).kind
            result = run_comparison(config, st.empty(), kind)
        except Exception as error:  # one line, never a traceback
            st.error(": ".join(common.visitor_message(error)))
            return None
        st.session_state[RESULT_KEY] = result
        return result
    return None


def default_config(quiet: bool = False) -> CompareConfig | None:
    try:
        return common.build_config(common.Controls())
    except Exception as error:  # e.g. the default backbone's statistics not ready here
        if not quiet:
            st.error(": ".join(common.visitor_message(error)))
        return None


def run_caption(result: ComparisonResult) -> None:
    st.caption(f"Showing: {common.run_title(result)} · backbone {result.config.backbone} · "
               f"{common.SOURCE_TEXT.get(result.stats_source, result.stats_source)}")


def _final_grid(result: ComparisonResult):
    """The final grid of a result, drawn once per session and result (every widget change reruns the page)."""
    cached = st.session_state.get("_grid")
    if cached is None or cached[0] is not result:
        cached = (result, common.final_grid(result))
        st.session_state["_grid"] = cached
    return cached[1]


# -- settings that survive a page switch: Streamlit forgets a widget's state when its page is not
# shown, so each setting is also kept under a plain key and used as the widget's starting value.


def kept(key: str, default):
    return st.session_state.get(f"_kept_{key}", default)


def keep(key: str, value):
    st.session_state[f"_kept_{key}"] = value
    return value


def _index(options: list, value) -> int:
    return options.index(value) if value in options else 0


# -- the pages

def compare_page() -> None:
    st.title("D²-DPM: quantized diffusion, repaired")
    st.markdown(
        "The same noise goes through a full-precision (FP) model, its few-bit quantized copy and each correction; "
        "the rows show where they part. "
        f"[Paper]({common.PAPER_URL}) · [official code]({common.CODE_URL})"
    )
    # Run sits at the top of the page, not at the bottom of the settings: visible without scrolling on a
    # desktop, and pressable on a phone without opening the settings panel (which would then cover the result).
    top = st.columns([1, 3], vertical_alignment="center")
    run = top[0].button("Run comparison", type="primary", width="stretch", key="run")
    top[1].caption("Settings: the sidebar (on a phone, the **»** at the top left). The defaults are a good first run.")
    defaults = common.Controls()
    with st.sidebar:
        st.header("Settings")
        choices = [*common.MODEL_CHOICES, OTHER_MODEL]
        default = common.DEFAULT_MODEL if common.DEFAULT_MODEL in common.MODEL_CHOICES else OTHER_MODEL
        choice = keep("model_choice", st.selectbox("Model", choices, index=_index(choices, kept("model_choice", default)), key="model_choice",
                                                   help="the embedded models, or any diffusers model folder / hub id"))
        model = choice
        if choice == OTHER_MODEL:
            model = keep("model_path", st.text_input("Model folder or hub id",
                                                     value=kept("model_path", "" if default != OTHER_MODEL else common.DEFAULT_MODEL),
                                                     key="model_path", placeholder="path/to/diffusers/folder or owner/name"))
        summary = common.describe_model(model)
        if summary.ok:
            st.caption(summary.message.replace("**", ""))
        else:
            st.warning(summary.message)
        presets = [*common.PRESETS, "custom"]
        preset = keep("preset", st.radio("Bit-width preset", presets, index=_index(presets, kept("preset", common.DEFAULT_PRESET)),
                                         horizontal=True, key="preset", help="weights / activations"))
        w0, a0 = common.PRESETS.get(preset, (defaults.w_bits, defaults.a_bits))
        custom = preset == "custom"
        col_w, col_a = st.columns(2)
        w_bits = keep(f"w_bits_{preset}", col_w.slider("Weight bits", 2, 8, kept(f"w_bits_{preset}", w0), disabled=not custom, key=f"w_bits_{preset}"))
        a_bits = keep(f"a_bits_{preset}", col_a.slider("Activation bits", 4, 8, kept(f"a_bits_{preset}", a0), disabled=not custom, key=f"a_bits_{preset}"))
        backbones = common.BACKBONE_CHOICES
        backbone = keep("backbone", st.radio("PTQ backbone", backbones, index=_index(backbones, kept("backbone", common.DEFAULT_BACKBONE)),
                                             horizontal=True, key="backbone", help=common.BACKBONE_HELP))
        st.caption(common.BACKBONE_INFO[0].upper() + common.BACKBONE_INFO[1:] + ".")
        col_s, col_e = st.columns(2)
        steps = keep("steps", col_s.slider("DDIM steps", 1, common.MAX_UI_STEPS, kept("steps", defaults.steps), key="steps"))
        eta = keep("eta", col_e.slider("η", 0.0, 1.0, kept("eta", defaults.eta), 0.05, key="eta", help="0 = deterministic DDIM, 1 = DDPM-like"))
        guidance, class_choice = None, None
        if summary.ok and summary.conditional:
            guidance = keep("guidance", st.slider("Guidance scale", 0.0, 10.0, kept("guidance", defaults.guidance), 0.5, key="guidance",
                                                  help="classifier-free guidance"))
            classes = summary.class_choices()
            class_choice = keep("class_choice", st.selectbox("Class", classes, index=_index(classes, kept("class_choice", classes[0])),
                                                             key="class_choice"))
        col_seed, col_n = st.columns(2)
        seed = keep("seed", col_seed.number_input("Seed", 0, 2**31 - 1, kept("seed", defaults.seed), step=1, key="seed"))
        count = common.sample_count(summary)
        count_key = "num_images" if count.label == "Images" else "num_points"
        num_images = keep(count_key, col_n.slider(count.label, 1, count.maximum, kept(count_key, count.default), key=count_key))
        st.subheader("Corrections")
        st.caption("FP and the uncorrected quantized model are always shown.")
        col_m, col_v = st.columns(2)
        mean = keep("mean", col_m.toggle("Mean", kept("mean", defaults.mean), key="mean", help="subtract μ_cond(ε̂)"))
        variance = keep("variance", col_v.toggle("Variance", kept("variance", defaults.variance), key="variance", help="remove σ_cond"))
        modes = keep("modes", st.multiselect("Mode", list(common.MODES), default=kept("modes", list(defaults.modes)), key="modes",
                                             help="S-D²: subtract a draw of the noise · D-D²: absorb it into σ_t'"))
        note = common.rows_note(mean, variance, modes)
        if note:
            st.info(note, icon=":material/info:")
        # one checkbox per extra row of the method registry (PTQD, the oracle), keyed by the method's name
        rows = tuple(m.name for m, column in zip(common.ROW_METHODS, st.columns(len(common.ROW_METHODS)))
                     if keep(m.name, column.checkbox(m.ui_label, kept(m.name, m.name in defaults.rows), key=m.name, help=m.ui_hint or None)))
        with st.expander("Advanced"):
            calib_samples = keep("calib_samples", st.slider("Calibration trajectories", 2, common.MAX_CALIB_SAMPLES,
                                                            kept("calib_samples", defaults.calib_samples), key="calib_samples",
                                                            help="used when no shipped or cached statistics match"))
            granularities = common.GRANULARITY_CHOICES
            granularity = keep("granularity", st.radio("Noise model granularity", granularities,
                                                       index=_index(granularities, kept("granularity", defaults.granularity)), horizontal=True,
                                                       key="granularity"))
            st.caption(f"CPU budget: images × method rows × steps ≤ {common.MAX_IMAGE_STEPS}, "
                       f"and with a calibration (trajectories × steps × 2) ≤ {common.MAX_WORK}.")

    messages = st.container()  # errors show here, above any earlier result
    text_slot = st.empty()  # what the result means, above the grid: read first, then look
    slot = st.empty()
    if run:
        try:
            controls = common.Controls(model=model, w_bits=w_bits, a_bits=a_bits, steps=steps, eta=eta, guidance=guidance,
                                       class_choice=class_choice, seed=seed, num_images=num_images, mean=mean, variance=variance,
                                       modes=tuple(modes), rows=rows, calib_samples=calib_samples, granularity=granularity,
                                       backbone=backbone)
            plan = common.plan_run(controls)
            start = time.perf_counter()
            cached = result_store().get(plan.config) is not None
            result = run_comparison(plan, slot, summary.kind)
            st.session_state[RESULT_KEY] = result
            st.session_state[CONFIG_KEY] = plan.config
            st.session_state["seconds"] = time.perf_counter() - start
            st.session_state["cached"] = cached
        except Exception as error:  # keep serving: one line for the visitor, no traceback
            title, message = common.visitor_message(error)
            messages.error(f"{title}: {message}")

    result = current_result()
    if result is None:
        slot.empty()
        landing()
        return
    kind = result.model.kind
    grid = _final_grid(result)
    text_slot.markdown(common.summary_markdown(result, st.session_state.get("seconds"), cached=st.session_state.get("cached", False)))
    slot.image(grid, caption=common.samples_caption(kind))
    st.subheader("Metrics")
    st.dataframe(common.metrics_display(result.metrics, kind), hide_index=True, width="stretch")
    left, right = st.columns([3, 2])
    with left:
        st.plotly_chart(figures.metrics_figure(result.metrics, kind), width="stretch", theme=None, key="metrics_chart")
    with right:
        st.subheader("Downloads")
        for name, data, mime in common.download_payloads(result, grid):
            st.download_button(f"⬇ {name}", data, name, mime, key=f"dl_{name}")
    st.markdown(common.GUIDE)


def landing() -> None:
    """Before any run: the shipped example with its interpretation, and where to look."""
    example = story.load_example()
    if example is None:
        st.info("Press **Run comparison**. Every row starts from the same noise. (No precomputed example is installed: "
                "`python scripts/make_example.py` makes one.)")
    else:
        st.markdown(f"{story.example_note(example, default_config(quiet=True))}  \n{example.text()}")
        st.image(example.grid, caption=common.samples_caption(example.numbers.get("kind", "image")))
        st.dataframe(common.metrics_display(example.metrics, example.numbers.get("kind", "image")), hide_index=True, width="stretch")
    st.markdown(common.GUIDE)


def deviation_page() -> None:
    st.title("Deviation curves")
    st.markdown(common.DEVIATION_INTRO)
    result = result_or_prompt()
    if result is None:
        return
    run_caption(result)
    st.plotly_chart(figures.deviation_figure(result.stats_table, title=f"Per-step quantization noise: {common.run_title(result)}"),
                    width="stretch", theme=None, key="deviation_chart")
    steps = len(result.records)
    st.subheader("The paper's Figure 2 on this model")
    step = st.slider("Step", 1, steps, steps // 2 + 1, key="deviation_step") - 1
    st.markdown(common.stats_caption(result, step))
    left, right = st.columns(2)
    left.plotly_chart(figures.delta_histogram_figure(result.stats, step), width="stretch", theme=None, key="hist_chart")
    right.plotly_chart(figures.joint_density_figure(result.stats, step), width="stretch", theme=None, key="joint_chart")
    with st.expander("The per-step table"):
        st.dataframe(result.stats_table, hide_index=True, width="stretch")


def trajectories_page() -> None:
    st.title("Trajectories")
    st.markdown(common.TRAJECTORIES_INTRO)
    result = result_or_prompt()
    if result is None:
        return
    run_caption(result)
    if result.model.kind == "points":
        all_paths = st.checkbox("toy2d: draw every trajectory (not only a handful)", key="all_paths")
        st.plotly_chart(figures.particles_figure(result, paths=None if all_paths else figures.HIGHLIGHTED_PATHS),
                        width="stretch", theme=None, key="particles_chart")
    st.plotly_chart(figures.trajectory_figure(result.trajectory, title=f"Distance to the full-precision trajectory: {common.run_title(result)}"),
                    width="stretch", theme=None, key="trajectory_chart")
    st.plotly_chart(figures.moments_figure(result.trajectory), width="stretch", theme=None, key="moments_chart")
    steps = len(result.records)
    step = st.slider("Step: predicted x₀ of every method", 1, steps, steps, key="trajectory_step") - 1
    st.markdown(common.step_caption(result, step))
    st.image(common.step_grid(result, step))


def method_page() -> None:
    st.title("Method")
    for kind, text in teaching.method_page_blocks():
        if kind == "latex":
            st.latex(text)
        else:
            st.markdown(text)
