"""The Gradio app as a public server: what a hostile or careless visitor can and cannot make it do.

Through a real server (`python app.py`) and gradio_client: bad input gives one-line messages and the
server keeps answering; models outside the operator's list are refused with one message whether they
exist or not; pickle weights are refused even for a listed model; uploads are capped; no request
leaves its temporary folder behind; and under load (two maximal calibrations and an ordinary
comparison) the ordinary one completes while the calibration runs, memory stays under 3 GB, and a
stopped calibration gives its lane back.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from app_helpers import ROOT, gradio_server
from conftest import save_pipeline_folder, tiny_unet
from d2dpm_app import common
from test_gradio_app import compare_args

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError


def save_pickle_only(folder: Path) -> Path:
    """A pipeline folder whose weights are a pickle (.bin) only."""
    save_pipeline_folder(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny_unet().state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def public(tmp_path_factory, conditional_model_dir):
    tmp = tmp_path_factory.mktemp("public_server")
    pickle_only = save_pickle_only(tmp / "pickle_only")
    (tmp / "tmpdir").mkdir()
    env = {"D2DPM_EXTRA_MODELS": f"{conditional_model_dir},{pickle_only}", "TMPDIR": str(tmp / "tmpdir")}
    with gradio_server(tmp, extra_env=env) as (url, process):
        yield {"url": url, "process": process, "tmp": tmp, "pickle_only": pickle_only}


@pytest.fixture
def client(public, tmp_path):
    return gradio_client.Client(public["url"], verbose=False, download_files=str(tmp_path / "downloads"))


def refusal(client, *args) -> str:
    with pytest.raises(AppError) as refused:
        client.predict(*args, api_name="/compare")
    return str(refused.value)


def one_line(message: str, tmp: Path, typed: str = "") -> None:
    """One line, no traceback, and no server path but what the visitor typed."""
    assert "\n" not in message.strip() and "Traceback" not in message
    message = message.replace(typed, "<typed>") if typed else message
    assert str(tmp) not in message and str(ROOT) not in message


def test_models_outside_the_list_are_refused_alike_whether_or_not_they_exist(client, public, pipeline_model_dir):
    existing = str(pipeline_model_dir)  # a real, loadable model folder the operator did not list
    missing = str(Path(existing).parent / ("x" * len(Path(existing).name)))
    messages = [refusal(client, *compare_args(spec)) for spec in (existing, missing, "/etc", "../../assets/models/emoji", "someone/some-model")]
    shapes = {message.replace(repr(spec), "<spec>") for message, spec in
              zip(messages, (existing, missing, "/etc", "../../assets/models/emoji", "someone/some-model"))}
    assert len(shapes) == 1, messages  # the same words for every one of them
    assert "D2DPM_EXTRA_MODELS" in messages[0]
    for message, spec in zip(messages, (existing, missing)):
        one_line(message, public["tmp"], spec)
    info, *_ = client.predict(existing, api_name="/model_info")
    info_missing, *_ = client.predict(missing, api_name="/model_info")
    assert info.replace(existing, "<spec>") == info_missing.replace(missing, "<spec>")


def test_pickle_weights_are_refused_even_for_a_listed_model(client, public):
    message = refusal(client, *compare_args(public["pickle_only"]))
    assert "safetensors" in message and "pickle" in message
    one_line(message, public["tmp"], str(public["pickle_only"]))


def test_bad_inputs_give_one_line_and_the_server_keeps_answering(client, public, conditional_model_dir):
    # (what the message must say, or None where Gradio's own check of a widget's range may answer first)
    cases = [
        ("image-steps", compare_args(conditional_model_dir, num_images=32, steps=100)),
        ("whole run", compare_args(conditional_model_dir, calib_samples=512, steps=100, num_images=1)),
        ("bias-correction or rtn", compare_args(conditional_model_dir, backbone="adaround")),
        (None, compare_args(conditional_model_dir, backbone="gptq")),
        (None, compare_args(conditional_model_dir, w_bits=9)),
        (None, compare_args(conditional_model_dir, eta=3)),
        (None, compare_args(conditional_model_dir, modes=["X-D²"])),
        (None, compare_args(conditional_model_dir, seed=-5)),
    ]
    for expected, args in cases:
        for endpoint in ("/validate", "/compare"):
            with pytest.raises(AppError) as refused:
                client.predict(*args, api_name=endpoint)
            assert expected is None or expected in str(refused.value), (expected, str(refused.value))
            one_line(str(refused.value), public["tmp"], str(conditional_model_dir))
    assert public["process"].poll() is None
    message, *_ = client.predict(str(conditional_model_dir), api_name="/model_info")
    assert "class-conditional" in message


def test_uploads_are_capped(public):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * 200_000 + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(public["url"] + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    uploads = list((public["tmp"] / "gradio_tmp").rglob("big.bin"))
    assert uploads == []


def test_no_request_leaves_its_temporary_folder_behind(client, public, conditional_model_dir):
    tmpdir = public["tmp"] / "tmpdir"
    for seed in range(10):
        image, summary, metrics, files = client.predict(*compare_args(conditional_model_dir, seed=seed), api_name="/compare")
        assert {Path(f).name for f in files} >= {"grid.png", "metrics.csv", "run.json"}
    assert sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("d2dpm_")) == []


# -- load: two maximal calibrations and one ordinary comparison at once


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryWatch:
    """The peak resident memory of a process, sampled in a thread until stopped."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stopped = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, resident_bytes(self.pid))
            except OSError:
                return
            self.stopped.wait(0.1)

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join()
        return self.peak


def emoji_calibration_args(budget: int = common.MAX_WORK):
    """The largest calibration the budget allows on the emoji model: 1 image, FP and quantized rows,
    20 steps (40 image-steps of sampling), bias correction (2 × its fitting inputs), and as many
    trajectories as fit."""
    from d2dpm.calibration import RECONSTRUCTION_INPUTS

    trajectories = (budget - 40 - 2 * RECONSTRUCTION_INPUTS) // (20 * 2)
    return compare_args("emoji", steps=20, num_images=1, calib_samples=trajectories, ptqd=False, modes=[], seed=0,
                        w_bits=3, a_bits=7, backbone="bias-correction")


@pytest.mark.skipif(not (ROOT / "assets" / "models" / "emoji").is_dir(), reason="the embedded emoji model is not installed")
def test_load_two_maximal_calibrations_and_an_ordinary_comparison(tmp_path, conditional_model_dir):
    env = {"D2DPM_EXTRA_MODELS": str(conditional_model_dir), "TMPDIR": str(tmp_path)}
    with gradio_server(tmp_path, extra_env=env, timeout=180) as (url, process):
        watch = MemoryWatch(process.pid)
        clients = [gradio_client.Client(url, verbose=False, download_files=str(tmp_path / f"c{i}")) for i in range(4)]
        ordinary = compare_args(conditional_model_dir)
        clients[0].predict(*ordinary, api_name="/compare")  # its statistics are now ready: an ordinary comparison

        first = clients[1].submit(*emoji_calibration_args(), api_name="/compare")
        deadline = time.monotonic() + 300
        while not any("Calibrating" in str(output[1]) for output in first.outputs()):  # it holds the calibration lane
            assert not first.done(), first.exception()
            assert time.monotonic() < deadline, "the calibration never reported progress"
            time.sleep(0.2)
        with pytest.raises(AppError, match="calibration is running"):  # the second is refused, not queued
            clients[2].predict(*emoji_calibration_args(), api_name="/compare")
        image, summary, metrics, files = clients[0].predict(*ordinary, api_name="/compare")
        assert Path(image).is_file()
        assert not first.done()  # the ordinary comparison finished while the calibration still ran

        first.cancel()  # the visitor stops it: it ends at its next step and gives the lane back
        tiny_calibration = compare_args(conditional_model_dir, calib_samples=6)
        deadline = time.monotonic() + 300
        while True:
            try:
                clients[3].predict(*tiny_calibration, api_name="/compare")
                break
            except AppError as error:
                assert "calibration is running" in str(error)
                assert time.monotonic() < deadline, "the stopped calibration kept its lane"
                time.sleep(0.5)
        peak = watch.stop()
        assert process.poll() is None
    print(f"\npeak resident memory of the server: {peak / 2**30:.2f} GiB")
    assert peak < 3 * 2**30
