"""Both apps in a real browser: Debian's Chromium driven by Playwright (never `playwright install`).

Each test starts the app as a server on 127.0.0.1 (`python app.py`, `streamlit run app.py`) with a
tiny random model as its default, runs a small comparison through the page's own controls, waits
for the images and plots, checks that they rendered (the screenshot of each region varies; a blank
or failed element is one flat colour), then visits every view. Screenshots are saved to
$D2DPM_SCREENSHOT_DIR, else to a temporary folder; the test prints where.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
expect, sync_playwright = playwright_api.expect, playwright_api.sync_playwright

from app_helpers import CHROMIUM, CHROMIUM_ARGS, gradio_server, image_is_not_blank, streamlit_server

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (Debian package chromium)")

SERVER_START = 180  # seconds: importing torch, diffusers and the UI library on 2 busy cores
RESULT_WAIT = 120_000  # milliseconds for a comparison (calibration included) to finish
VIEW_WAIT = 60_000
VIEWPORT = {"width": 1400, "height": 1000}
STREAMLIT_VIEWPORT = {"width": 1400, "height": 1800}  # Streamlit scrolls inside the page: a tall window shows it all
PHONE = {"width": 390, "height": 844}
FAST = {"steps": 4, "images": 2, "calibration": 8}
BACKBONE = "rtn"  # the quickest backbone to calibrate; the example below is made with the same settings


@pytest.fixture(scope="module")
def example(conditional_model_dir, tmp_path_factory):
    """The landing's example for the tiny model, made as scripts/make_example.py makes it (same settings
    as the runs below), and the statistics cache it filled, which the servers then share."""
    from d2dpm.experiment import Workbench
    from d2dpm.figures import run_title
    from d2dpm_app import common, story

    cache = tmp_path_factory.mktemp("shared_cache")
    from d2dpm.config import DEFAULT_METHODS, CompareConfig

    config = CompareConfig(model=str(conditional_model_dir), w_bits=4, a_bits=8, steps=FAST["steps"], eta=0.0, guidance=3.0,
                           methods=DEFAULT_METHODS, seed=0, num_images=FAST["images"], calib_samples=FAST["calibration"],
                           backbone=BACKBONE)
    result = Workbench(cache_dir=cache, device="cpu").compare(config)
    folder = tmp_path_factory.mktemp("example")
    story.write_example(result, common.final_grid(result), run_title(result), folder)
    return folder, cache


def no_horizontal_overflow(page, where: str) -> None:
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"{where}: the page is {width[0]} px wide on a {width[1]} px screen"


def in_viewport_without_scrolling(page, locator, where: str) -> None:
    page.evaluate("() => window.scrollTo(0, 0)")
    box = locator.bounding_box()
    height = page.viewport_size["height"]
    assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= height, f"{where}: {box} not within the first {height} px"


def buttons_clear_of_the_image(page, selector: str) -> None:
    """The image's floating buttons (fullscreen, download) sit above the picture, not over its title line."""
    boxes = page.evaluate(f"""() => {{ const block = document.querySelector({selector!r});
        const buttons = block.querySelector('.icon-button-wrapper'), image = block.querySelector('img');
        return buttons && image ? [buttons.getBoundingClientRect().bottom, image.getBoundingClientRect().top] : null; }}""")
    assert boxes is None or boxes[0] <= boxes[1] + 1, f"{selector}: the buttons end at {boxes[0]}, the image starts at {boxes[1]}"


def reading_order(page, selectors: list[str], where: str) -> None:
    """The elements come down the page in this order."""
    tops = page.evaluate("(selectors) => selectors.map(s => document.querySelector(s).getBoundingClientRect().top + window.scrollY)", selectors)
    assert tops == sorted(tops), f"{where}: {dict(zip(selectors, tops))}"


def not_pixelated(page, selector: str) -> None:
    """The displayed grid is scaled smoothly (pixelated downscaling garbled its text labels)."""
    rendering = page.evaluate(f"() => Array.from(document.querySelectorAll({selector!r})).map(e => getComputedStyle(e).imageRendering)")
    assert rendering and all(r not in ("pixelated", "crisp-edges") for r in rendering), rendering


@pytest.fixture(scope="module")
def browser():

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("D2DPM_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


class Shots:
    """Saves screenshots under one prefix and checks that a region is not blank."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix

    @contextmanager
    def on_failure(self, page):
        """Keep a screenshot of the page as it was when a step failed."""
        try:
            yield
        except BaseException:
            try:
                self.page(page, "FAILED")
            except Exception:  # the page may be gone; the original error matters more
                pass
            raise

    def page(self, page, name: str) -> None:
        page.screenshot(path=str(self.folder / f"{self.prefix}-{name}.png"), full_page=True)

    def region(self, locator, name: str) -> None:
        locator.scroll_into_view_if_needed()
        png = locator.screenshot(path=str(self.folder / f"{self.prefix}-{name}.png"), animations="disabled")
        assert image_is_not_blank(png), f"{self.prefix} {name}: the region rendered blank (see {self.folder})"


def plotly_rendered(locator) -> None:
    """Wait until a plotly figure has drawn its traces into the region."""
    locator.locator(".main-svg").first.wait_for(timeout=VIEW_WAIT)
    locator.locator("g.trace").first.wait_for(state="attached", timeout=VIEW_WAIT)


# -- Gradio

def gradio_number(page, elem_id: str, value: int) -> None:
    """Type into a Gradio slider's number box."""
    box = page.locator(f"#{elem_id} input[type='number']")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def drive_gradio(page, url: str, shots: Shots) -> None:
    page.goto(url)
    page.locator("#run-button").wait_for(timeout=VIEW_WAIT)
    page.get_by_text("class-conditional").first.wait_for(timeout=VIEW_WAIT)  # the model box found the tiny model
    # The landing: the example's images and interpretation before any click, Run in sight.
    landing = page.locator("#samples img").first
    landing.wait_for(timeout=VIEW_WAIT)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=landing.element_handle(), timeout=VIEW_WAIT)
    expect(page.locator("#summary")).to_contain_text("What quantization did")
    expect(page.locator("#summary")).to_contain_text("Precomputed example")
    in_viewport_without_scrolling(page, page.locator("#run-button"), "gradio run button")
    not_pixelated(page, "#samples img")
    buttons_clear_of_the_image(page, "#samples")
    shots.page(page, "0-start")
    # Views opened before a run: a prompt, not an empty plot.
    for tab, prompt in (("Deviation curves", "#deviation-prompt"), ("Trajectories", "#trajectories-prompt")):
        page.get_by_role("tab", name=tab).click()
        expect(page.locator(prompt)).to_contain_text("No comparison yet", timeout=VIEW_WAIT)
        assert page.locator(".js-plotly-plot").count() == 0
        expect(page.locator(prompt).get_by_role("button", name="Run comparison")).to_be_visible()
        shots.page(page, f"0-before-run-{tab.split()[0].lower()}")
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#downloads")).to_be_hidden()  # no empty file box before a run has written files

    gradio_number(page, "steps", FAST["steps"])
    gradio_number(page, "num-images", FAST["images"])
    page.locator("#backbone").get_by_text(BACKBONE, exact=True).click()
    page.locator("#advanced").get_by_text("Advanced").first.click()
    gradio_number(page, "calib-samples", FAST["calibration"])
    # The preset follows the bit sliders: W6A8 is no preset.
    gradio_number(page, "w-bits", 6)
    expect(page.locator("#preset input[value='custom']")).to_be_checked(timeout=VIEW_WAIT)
    gradio_number(page, "w-bits", 4)
    expect(page.locator("#preset input[value='W4A8']")).to_be_checked(timeout=VIEW_WAIT)
    page.locator("#run-button").click()

    downloads = page.locator("#downloads")
    expect(downloads.get_by_role("cell", name="grid.png")).to_be_visible(timeout=RESULT_WAIT)  # the run finished
    page.locator("#samples img").first.wait_for(timeout=VIEW_WAIT)
    expect(page.locator("#summary")).not_to_contain_text("Precomputed example", timeout=VIEW_WAIT)
    not_pixelated(page, "#samples img")
    shots.region(page.locator("#samples"), "1-samples")
    metrics = page.locator("#metrics")
    for label in ("FP", "Quantized", "PTQD", "S-D²", "D-D²"):
        expect(metrics).to_contain_text(label, timeout=VIEW_WAIT)
    shots.region(metrics, "1-metrics")
    for name in ("trajectory.csv", "stats.csv", "metrics.csv"):
        expect(downloads.get_by_role("cell", name=name)).to_be_visible()
    shots.page(page, "1-compare")

    page.get_by_role("tab", name="Deviation curves").click()
    for elem_id in ("deviation-plot", "hist-plot", "joint-plot"):
        region = page.locator(f"#{elem_id}")
        plotly_rendered(region)
        shots.region(region, f"2-{elem_id}")
    # The step slider answers the keyboard, not only a mouse release.
    before = page.locator("body").inner_text()
    thumb = page.locator("#dev-step input[type='range']")
    thumb.focus()
    thumb.press("Home")
    expect(page.locator("body")).to_contain_text("Step 1 (t =", timeout=VIEW_WAIT)
    assert "Step 1 (t =" not in before
    shots.page(page, "2-deviation")

    page.get_by_role("tab", name="Trajectories").click()
    for elem_id in ("traj-plot", "moments-plot"):
        region = page.locator(f"#{elem_id}")
        plotly_rendered(region)
        shots.region(region, f"3-{elem_id}")
    page.locator("#x0-step img").first.wait_for(timeout=VIEW_WAIT)
    shots.region(page.locator("#x0-step"), "3-x0-step")
    shots.page(page, "3-trajectories")

    page.get_by_role("tab", name="Method").click()
    page.locator(".katex").first.wait_for(timeout=VIEW_WAIT)  # the equations rendered as LaTeX
    assert page.locator(".katex").count() >= 5
    assert page.locator("a[href*='2501.08180']").count() and page.locator("a[href*='TaylorJocelyn/D2-DPM']").count()
    shots.page(page, "4-method")

    # A bad input shows a message, not a traceback; the page keeps working.
    page.get_by_role("tab", name="Compare").click()
    gradio_number(page, "steps", 100)
    gradio_number(page, "num-images", 32)
    page.locator("#run-button").click()
    expect(page.locator("body")).to_contain_text("image-steps", timeout=VIEW_WAIT)
    shots.page(page, "5-error")
    assert "Traceback" not in page.content()


def run_in_chromium(browser, screenshots, prefix: str, server, viewport: dict, drive) -> None:
    """Serve the app, open it in Chromium and drive it; no JavaScript error may reach the page."""
    shots = Shots(screenshots, prefix)
    with server as (url, _):
        page = browser.new_page(viewport=viewport)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        with shots.on_failure(page):
            drive(page, url, shots)
        assert not errors, errors
        page.close()


def drive_gradio_phone(page, url: str, shots: Shots) -> None:
    page.goto(url)
    page.locator("#run-button").wait_for(timeout=VIEW_WAIT)
    landing = page.locator("#samples img").first
    landing.wait_for(state="attached", timeout=VIEW_WAIT)
    landing.scroll_into_view_if_needed()  # Gradio loads an image when it is scrolled to
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=landing.element_handle(), timeout=VIEW_WAIT)
    no_horizontal_overflow(page, "gradio landing")
    # A phone reads the story first: title, interpretation, the example grid, then the settings with Run.
    reading_order(page, ["#title", "#summary", "#samples", "#model", "#run-button", "#metrics", "#guide"], "gradio phone landing")
    buttons_clear_of_the_image(page, "#samples")
    shots.page(page, "phone-0-landing")
    gradio_number(page, "steps", FAST["steps"])
    gradio_number(page, "num-images", FAST["images"])
    page.locator("#backbone").get_by_text(BACKBONE, exact=True).click()
    page.locator("#advanced").get_by_text("Advanced").first.click()
    gradio_number(page, "calib-samples", FAST["calibration"])
    page.locator("#run-button").click()
    expect(page.locator("#downloads").get_by_role("cell", name="grid.png")).to_be_visible(timeout=RESULT_WAIT)
    no_horizontal_overflow(page, "gradio after a run")
    grid_top = page.evaluate("() => document.querySelector('#samples').getBoundingClientRect().top")
    assert 0 <= grid_top < PHONE["height"], f"after Run the grid is not in view on a phone (top at {grid_top})"
    shots.page(page, "phone-1-result")


def test_gradio_app_in_chromium(browser, screenshots, conditional_model_dir, example, tmp_path, monkeypatch):
    folder, cache = example
    monkeypatch.setenv("D2DPM_CACHE_DIR", str(cache))
    server = gradio_server(tmp_path, model=str(conditional_model_dir), timeout=SERVER_START, example=folder)
    run_in_chromium(browser, screenshots, "gradio", server, VIEWPORT, drive_gradio)


def test_gradio_app_on_a_phone(browser, screenshots, conditional_model_dir, example, tmp_path, monkeypatch):
    folder, cache = example
    monkeypatch.setenv("D2DPM_CACHE_DIR", str(cache))
    server = gradio_server(tmp_path, model=str(conditional_model_dir), timeout=SERVER_START, example=folder)
    run_in_chromium(browser, screenshots, "gradio", server, PHONE, drive_gradio_phone)


# -- Streamlit

def streamlit_slider(page, label: str, value: int | str, minimum: int = 0) -> None:
    """Move a Streamlit slider with the keyboard: "end" for its maximum, else Home and one
    ArrowRight per step (each key is a rerun on the server, so keep the distances short)."""
    thumb = page.locator(f"input[type='range'][aria-label='{label}']")
    thumb.focus()
    if value == "end":
        thumb.press("End")
        value = thumb.get_attribute("max")
    else:
        thumb.press("Home")
        for _ in range(value - minimum):
            thumb.press("ArrowRight")
    page.wait_for_function(f"() => document.querySelector(\"input[type='range'][aria-label='{label}']\").value == '{value}'",
                           timeout=VIEW_WAIT)


# While a script runs, Streamlit marks the previous output stale and may show a running icon.
STREAMLIT_IDLE_JS = """() => !document.querySelector(
    "[data-stale='true'], [data-testid='stStatusWidgetRunningIcon'], [data-testid='stStatusWidgetRunningManIcon']")"""


def streamlit_idle(page, settle_ms: int = 300) -> None:
    """Wait until the script run is over.

    A slider sends its value a moment after the last key, and the rerun that follows would wipe
    a message shown by a button press in between: after moving sliders, settle longer."""
    page.wait_for_timeout(settle_ms)
    page.wait_for_function(STREAMLIT_IDLE_JS, timeout=RESULT_WAIT)


def open_page(page, title: str, heading: str | None = None) -> None:
    """Follow the sidebar's navigation link `title`; wait for the page's heading."""
    page.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()
    page.locator("h1").filter(has_text=heading or title).first.wait_for(timeout=VIEW_WAIT)
    streamlit_idle(page)


def streamlit_fast_settings(page) -> None:
    streamlit_slider(page, "DDIM steps", FAST["steps"], 1)
    streamlit_slider(page, "Images", FAST["images"], 1)
    page.locator("[data-testid='stSidebar']").get_by_text(BACKBONE, exact=True).click()
    page.locator("[data-testid='stSidebar'] [data-testid='stExpander'] summary").first.click()
    streamlit_slider(page, "Calibration trajectories", FAST["calibration"], 2)
    streamlit_idle(page, settle_ms=1500)


def drive_streamlit(page, url: str, shots: Shots) -> None:
    page.set_viewport_size(VIEWPORT)
    # A direct link to a view opens it, with no "Page not found" first.
    page.goto(url + "method")
    expect(page.locator("[data-testid='stMain']")).to_contain_text("Quantized diffusion", timeout=VIEW_WAIT)
    streamlit_idle(page)
    expect(page.get_by_text("Page not found")).to_have_count(0)
    page.goto(url)
    run = page.get_by_role("button", name="Run comparison")
    run.wait_for(timeout=VIEW_WAIT)
    streamlit_idle(page)
    main = page.locator("[data-testid='stMain']")
    # The landing: the example's images and interpretation before any click, Run in sight.
    landing = main.locator("[data-testid='stImage'] img").first
    landing.wait_for(timeout=VIEW_WAIT)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=landing.element_handle(), timeout=VIEW_WAIT)
    expect(main).to_contain_text("What quantization did")
    in_viewport_without_scrolling(page, run, "streamlit run button")
    shots.page(page, "0-start")
    for title in ("Deviation curves", "Trajectories"):
        open_page(page, title)
        expect(main).to_contain_text("No comparison yet", timeout=VIEW_WAIT)
        assert main.locator("[data-testid='stPlotlyChart']").count() == 0
        shots.page(page, f"0-before-run-{title.split()[0].lower()}")
    open_page(page, "Compare", heading="D²-DPM")
    page.set_viewport_size(STREAMLIT_VIEWPORT)

    streamlit_fast_settings(page)
    page.get_by_role("button", name="Run comparison").click()

    expect(main).to_contain_text("Downloads", timeout=RESULT_WAIT)  # the run finished
    streamlit_idle(page)
    assert not page.locator("[data-testid='stException']").count()
    grid = main.locator("[data-testid='stImage'] img").first
    grid.wait_for(timeout=VIEW_WAIT)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=grid.element_handle(), timeout=VIEW_WAIT)
    shots.region(grid, "1-samples")
    table = main.locator("[data-testid='stDataFrame']").first
    table.wait_for(timeout=VIEW_WAIT)
    shots.region(table, "1-metrics")
    charts = main.locator("[data-testid='stPlotlyChart']")
    if charts.count():
        plotly_rendered(charts.first)
        shots.region(charts.first, "1-chart")
    from d2dpm_app.common import DOWNLOAD_NAMES

    for name in DOWNLOAD_NAMES:  # the same files as Gradio's downloads
        expect(main.locator("[data-testid='stDownloadButton']").filter(has_text=name)).to_have_count(1)
    shots.page(page, "1-compare")

    open_page(page, "Deviation curves")
    charts = main.locator("[data-testid='stPlotlyChart']")
    charts.nth(2).wait_for(timeout=VIEW_WAIT)  # curves, Δ histogram, joint density
    for index in range(3):
        plotly_rendered(charts.nth(index))
        shots.region(charts.nth(index), f"2-plot{index}")
    shots.page(page, "2-deviation")

    open_page(page, "Trajectories")
    charts = main.locator("[data-testid='stPlotlyChart']")
    charts.nth(1).wait_for(timeout=VIEW_WAIT)
    for index in range(2):
        plotly_rendered(charts.nth(index))
        shots.region(charts.nth(index), f"3-plot{index}")
    step_image = main.locator("[data-testid='stImage'] img").first
    step_image.wait_for(timeout=VIEW_WAIT)
    shots.region(step_image, "3-x0-step")
    shots.page(page, "3-trajectories")

    open_page(page, "Method")
    page.locator(".katex").first.wait_for(timeout=VIEW_WAIT)
    assert page.locator(".katex").count() >= 5
    assert page.locator("a[href*='2501.08180']").count() and page.locator("a[href*='TaylorJocelyn/D2-DPM']").count()
    shots.page(page, "4-method")

    # A bad input shows st.error, not a traceback; the app keeps serving.
    open_page(page, "Compare", heading="D²-DPM")
    streamlit_slider(page, "DDIM steps", "end")
    streamlit_slider(page, "Images", "end")
    streamlit_idle(page, settle_ms=1500)
    page.get_by_role("button", name="Run comparison").click()
    error = main.locator("[data-testid='stAlertContentError']").first
    expect(error).to_contain_text("image-steps", timeout=VIEW_WAIT)
    assert not page.locator("[data-testid='stException']").count()
    shots.page(page, "5-error")


def drive_streamlit_phone(page, url: str, shots: Shots) -> None:
    page.goto(url)
    run = page.get_by_role("button", name="Run comparison")
    run.wait_for(timeout=VIEW_WAIT)
    streamlit_idle(page)
    page.locator("[data-testid='stMain'] [data-testid='stImage'] img").first.wait_for(timeout=VIEW_WAIT)
    no_horizontal_overflow(page, "streamlit landing")
    shots.page(page, "phone-0-landing")
    # Settings live in the sidebar, closed on a phone: open it, choose, close it, then Run (on the page itself).
    page.locator("[data-testid='stExpandSidebarButton'], [data-testid='stSidebarCollapsedControl'] button").first.click()
    streamlit_fast_settings(page)
    page.locator("[data-testid='stSidebar'] [data-testid='stSidebarCollapseButton'] button, "
                 "[data-testid='stSidebarHeader'] button").first.click()
    run.click()
    main = page.locator("[data-testid='stMain']")
    expect(main).to_contain_text("Downloads", timeout=RESULT_WAIT)
    streamlit_idle(page)
    assert not page.locator("[data-testid='stSidebar'][aria-expanded='true']").count()  # nothing covers the result
    no_horizontal_overflow(page, "streamlit after a run")
    shots.page(page, "phone-1-result")


def test_streamlit_app_in_chromium(browser, screenshots, conditional_model_dir, example, tmp_path, monkeypatch):
    folder, cache = example
    monkeypatch.setenv("D2DPM_CACHE_DIR", str(cache))
    server = streamlit_server(tmp_path, model=str(conditional_model_dir), timeout=SERVER_START, example=folder)
    run_in_chromium(browser, screenshots, "streamlit", server, STREAMLIT_VIEWPORT, drive_streamlit)


def test_streamlit_app_on_a_phone(browser, screenshots, conditional_model_dir, example, tmp_path, monkeypatch):
    folder, cache = example
    monkeypatch.setenv("D2DPM_CACHE_DIR", str(cache))
    server = streamlit_server(tmp_path, model=str(conditional_model_dir), timeout=SERVER_START, example=folder)
    run_in_chromium(browser, screenshots, "streamlit", server, PHONE, drive_streamlit_phone)
