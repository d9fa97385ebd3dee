"""Start the Gradio and Streamlit apps as real servers on 127.0.0.1 and a free port (test helper)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from d2dpm.tools.bench import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server did not answer {url} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _env(tmp: Path, model: str | None, extra_env: dict | None = None, example: Path | None = None) -> dict:
    """The server's environment: its own temporary folders and cache, no network; the tiny test models
    have no shipped statistics, so the apps calibrate them with bias correction (AdaRound is refused there).
    `example`: the landing's example folder (D2DPM_EXAMPLE_DIR)."""
    env = dict(os.environ)
    env.update(
        GRADIO_TEMP_DIR=str(tmp / "gradio_tmp"),
        HF_HUB_OFFLINE="1",
        D2DPM_CACHE_DIR=os.environ.get("D2DPM_CACHE_DIR", str(tmp / "cache")),
        D2DPM_APP_BACKBONE="bias-correction",
        PYTHONUNBUFFERED="1",
    )
    if model is not None:
        env["D2DPM_APP_MODEL"] = model  # the operator's default model is allowed too
    if example is not None:
        env["D2DPM_EXAMPLE_DIR"] = str(example)
    env.update(extra_env or {})
    return env


@contextmanager
def _serve(command: list[str], env: dict, url: str, log: Path, health: str, timeout: float):
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(health, process, log, timeout)
        yield url, process
    finally:
        stop_process(process)


@contextmanager
def gradio_server(tmp: Path, model: str | None = None, timeout: float = 90, extra_env: dict | None = None,
                  example: Path | None = None):
    """`python app.py`; yields (url, process)."""
    port = free_port()
    env = _env(tmp, model, extra_env, example)
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
    url = f"http://127.0.0.1:{port}/"
    with _serve([sys.executable, "app.py"], env, url, tmp / "gradio.log", url, timeout) as served:
        yield served


@contextmanager
def streamlit_server(tmp: Path, model: str | None = None, timeout: float = 90, extra_env: dict | None = None,
                     example: Path | None = None):
    """`streamlit run app.py`; yields (url, process)."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1", "--server.port", str(port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
               "--global.developmentMode", "false"]
    url = f"http://127.0.0.1:{port}/"
    with _serve(command, _env(tmp, model, extra_env, example), url, tmp / "streamlit.log", url + "_stcore/health", timeout) as served:
        yield served


# -- a small comparison that every UI test can afford on 2 cores

SMALL = dict(w_bits=4, a_bits=8, steps=6, eta=0.0, num_images=3, calib_samples=8, seed=0)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def small_config(model_dir, **changes):
    from d2dpm.experiment import CompareConfig

    settings = dict(SMALL, methods=("fp", "q", "ptqd", "s-d2", "d-d2"))
    settings.update(changes)
    return CompareConfig(model=str(model_dir), **settings)


def image_is_not_blank(png: bytes, min_std: float = 8.0) -> bool:
    """A rendered screenshot has content: its pixels vary and it is not one flat colour."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    return pixels.std() >= min_std and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16
