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
VIEWPORT = {"width": 1440, "height": 1000}
STREAMLIT_VIEWPORT = {"width": 1440, "height": 1800}  # Streamlit scrolls inside the page: a tall window shows it all
FAST = {"steps": 4, "images": 2, "calibration": 8}


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
    shots.page(page, "0-start")

    gradio_number(page, "steps", FAST["steps"])
    gradio_number(page, "num-images", FAST["images"])
    page.locator("#advanced").get_by_text("Advanced").first.click()
    gradio_number(page, "calib-samples", FAST["calibration"])
    page.locator("#run-button").click()

    downloads = page.locator("#downloads")
    expect(downloads.get_by_role("cell", name="grid.png")).to_be_visible(timeout=RESULT_WAIT)  # the run finished
    page.locator("#samples img").first.wait_for(timeout=VIEW_WAIT)
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


def test_gradio_app_in_chromium(browser, screenshots, conditional_model_dir, tmp_path):
    server = gradio_server(tmp_path, model=str(conditional_model_dir), timeout=SERVER_START)
    run_in_chromium(browser, screenshots, "gradio", server, VIEWPORT, drive_gradio)


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


def drive_streamlit(page, url: str, shots: Shots) -> None:
    page.goto(url)
    page.get_by_role("button", name="Run comparison").wait_for(timeout=VIEW_WAIT)
    streamlit_idle(page)
    shots.page(page, "0-start")

    streamlit_slider(page, "DDIM steps", FAST["steps"], 1)
    streamlit_slider(page, "Images", FAST["images"], 1)
    page.locator("[data-testid='stSidebar'] [data-testid='stExpander'] summary").first.click()
    streamlit_slider(page, "Calibration trajectories", FAST["calibration"], 2)
    streamlit_idle(page, settle_ms=1500)
    page.get_by_role("button", name="Run comparison").click()

    main = page.locator("[data-testid='stMain']")
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
    assert main.locator("[data-testid='stDownloadButton']").count() >= 3
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


def test_streamlit_app_in_chromium(browser, screenshots, conditional_model_dir, tmp_path):
    server = streamlit_server(tmp_path, model=str(conditional_model_dir), timeout=SERVER_START)
    run_in_chromium(browser, screenshots, "streamlit", server, STREAMLIT_VIEWPORT, drive_streamlit)
