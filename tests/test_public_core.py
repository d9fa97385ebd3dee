"""The pieces behind a safe public app, without a server: the allow-list, safetensors-only loading,
hub downloads (a fake hub serving a local folder), streamed hashing, the work budget with
calibration counted, the calibration lane, stopping a run, and bounded caches."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import save_pipeline_folder, tiny_unet
from d2dpm import models
from d2dpm.errors import Busy, Cancelled, ConfigError
from d2dpm.experiment import LRU, KeyedLocks, Workbench


def test_the_allow_list_admits_embedded_and_listed_models_only(tmp_path, monkeypatch):
    listed = save_pipeline_folder(tmp_path / "listed")
    monkeypatch.setenv("D2DPM_EXTRA_MODELS", f" {listed} , owner/model ")
    monkeypatch.delenv("D2DPM_APP_MODEL", raising=False)
    assert models.check_public("emoji") == "emoji"
    assert models.check_public(str(listed) + "/") == str(listed)  # the same folder, spelled differently
    assert models.check_public("owner/model") == "owner/model"
    refused = []
    for spec in (str(tmp_path), str(tmp_path / "nowhere"), str(listed / "unet"), "owner/other", "../listed", "~", ""):
        with pytest.raises(ConfigError) as error:
            models.check_public(spec)
        refused.append(error.value.allowed)
    assert len(set(refused)) == 1 and "D2DPM_EXTRA_MODELS" in refused[0]
    assert models.load_model(str(listed), public=True).kind == "image"


def test_pickle_weights_are_refused_and_safetensors_are_hashed_in_chunks(tmp_path, monkeypatch):
    folder = save_pipeline_folder(tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    schedule = {k: v for k, v in json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).items() if not k.startswith("_")}
    expected = hashlib.sha256(weights.read_bytes() + json.dumps(schedule, sort_keys=True).encode()).hexdigest()[:12]
    monkeypatch.setattr(models, "HASH_CHUNK", 1000)  # many chunks: the same digest as reading the file whole
    assert models.load_model(str(folder)).identity.endswith("@" + expected)

    pickled = save_pipeline_folder(tmp_path / "pickled")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny_unet().state_dict(), pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickle"):
        models.load_model(str(pickled))


class FakeHub:
    """HfApi().model_info and hf_hub_download over a local folder; records what was fetched."""

    def __init__(self, folder: Path, cache: Path, sizes: dict | None = None):
        self.folder, self.cache, self.fetched, self.sizes = folder, cache, [], sizes or {}

    def model_info(self, repo_id, files_metadata=False):
        files = [p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()]
        return SimpleNamespace(sha="abc", siblings=[SimpleNamespace(rfilename=f, size=self.sizes.get(f, (self.folder / f).stat().st_size))
                                                     for f in files])

    def download(self, repo_id, filename, revision=None):
        self.fetched.append(filename)
        target = self.cache / repo_id / revision / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.folder / filename, target)
        return str(target)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def install(folder: Path, sizes: dict | None = None) -> FakeHub:
        hub = FakeHub(folder, tmp_path / "hub_cache", sizes)
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
        return hub

    return install


def test_a_hub_model_downloads_only_its_configs_and_safetensors_weights(tmp_path, fake_hub):
    repo = save_pipeline_folder(tmp_path / "repo")
    torch.save({"payload": 1}, repo / "unet" / "diffusion_pytorch_model.bin")  # never fetched
    (repo / "README.md").write_text("x" * 10_000)
    hub = fake_hub(repo)
    model = models.load_model("someone/tiny-ddpm")
    assert model.sample_shape == (3, 8, 8)
    assert sorted(hub.fetched) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                   "unet/diffusion_pytorch_model.safetensors"]


def test_a_hub_model_over_the_size_limit_or_without_safetensors_is_refused_before_downloading(tmp_path, fake_hub):
    repo = save_pipeline_folder(tmp_path / "repo")
    hub = fake_hub(repo, sizes={"unet/diffusion_pytorch_model.safetensors": int(models.MAX_DOWNLOAD_MB * 1e6) + 1})
    with pytest.raises(ConfigError, match="D2DPM_MAX_DOWNLOAD_MB"):
        models.load_model("someone/huge")
    assert hub.fetched == []
    (repo / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"payload": 1}, repo / "unet" / "diffusion_pytorch_model.bin")
    hub = fake_hub(repo)
    with pytest.raises(ConfigError, match="pickle weights"):
        models.load_model("someone/pickled")
    assert hub.fetched == []


def test_loaded_models_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MAX_LOADED_MODELS", 2)
    monkeypatch.setattr(models, "_loaded", type(models._loaded)())
    folders = [save_pipeline_folder(tmp_path / f"m{i}", seed=i) for i in range(3)]
    for folder in folders:
        models.load_model(str(folder))
    assert len(models._loaded) == 2 and str(folders[0].resolve()) not in models._loaded


def test_lru_and_keyed_locks_stay_small():
    cache = LRU(2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1  # a is now the most recent
    cache["c"] = 3
    assert "b" not in cache and cache.get("a") == 1 and len(cache) == 2
    locks = KeyedLocks()
    with locks("x"):
        assert len(locks) == 1
    assert len(locks) == 0



def test_the_disk_cache_of_statistics_is_bounded_least_recently_used_first(conditional_model_dir, tmp_path, monkeypatch):
    import os

    from d2dpm import experiment
    from d2dpm.experiment import CompareConfig

    workbench = Workbench(cache_dir=tmp_path, device="cpu")
    folder = tmp_path / "stats"
    folder.mkdir()
    old = []
    for index in range(5):  # earlier calibrations, the first the least recently used
        path = folder / f"old{index}.safetensors"
        path.write_bytes(b"\0" * 1000)
        os.utime(path, (1_000_000 + index, 1_000_000 + index))
        old.append(path)
    os.utime(old[0], (2_000_000, 2_000_000))  # the oldest file was used since: it stays
    monkeypatch.setattr(experiment, "MAX_DISK_STATS", 3)
    config = CompareConfig(model=str(conditional_model_dir), steps=2, calib_samples=2, num_images=1, backbone="rtn")
    workbench.compare(config)  # calibrates and caches its statistics: three files may remain
    left = sorted(p.name for p in folder.glob("*.safetensors"))
    written = [name for name in left if not name.startswith("old")]
    assert len(left) == 3 and len(written) == 1, left
    assert {"old0.safetensors", "old4.safetensors"} <= set(left)  # the used one and the newest of the others
    assert not list(folder.glob("*.tmp"))
    # A size limit too: everything but the file just written goes when it alone exceeds it.
    removed = workbench.prune_cache(max_files=100, max_mb=0, keep=folder / written[0])
    assert sorted(p.name for p in folder.glob("*.safetensors")) == written and len(removed) == 2
    # A cache hit marks its file as used (the limit then removes others first).
    os.utime(folder / written[0], (1_000, 1_000))
    Workbench(cache_dir=tmp_path, device="cpu").compare(config)
    assert (folder / written[0]).stat().st_mtime > 1_000_000

# -- the apps' budget, lanes and stopping (in process, on the tiny model)

@pytest.fixture
def app(conditional_model_dir, monkeypatch):
    from d2dpm_app import common

    monkeypatch.setenv("D2DPM_EXTRA_MODELS", str(conditional_model_dir))
    monkeypatch.setattr(common, "DEFAULT_BACKBONE", "rtn")
    monkeypatch.setattr("d2dpm.experiment._default_workbench", Workbench())  # this test's own cache folder
    return common


def settings(model, **changes):
    from d2dpm_app.common import Controls

    values = dict(w_bits=4, a_bits=8, steps=4, eta=0.0, guidance=3.0, class_choice=None, seed=0, num_images=2, calib_samples=8)
    values.update(changes)
    return Controls(model=str(model), **values)


def test_the_budget_counts_calibration_until_the_statistics_are_ready(app, conditional_model_dir):
    plan = app.plan_run(settings(conditional_model_dir, backbone="bias-correction"))
    assert plan.calibrates and plan.work == 2 * 5 * 4 + 8 * 4 * 2 + 1024 * 2
    with pytest.raises(ConfigError) as refused:
        app.plan_run(settings(conditional_model_dir, calib_samples=512, steps=50))
    assert refused.value.argument == "calib_samples" and f"at most {app.MAX_WORK}" in refused.value.allowed
    with pytest.raises(ConfigError, match="bias-correction or rtn") as refused:
        app.plan_run(settings(conditional_model_dir, backbone="adaround"))
    assert refused.value.argument == "backbone"
    for event in app.stream_run(app.plan_run(settings(conditional_model_dir))):  # rtn: calibrates, then caches
        pass
    ready = app.plan_run(settings(conditional_model_dir))
    assert not ready.calibrates and ready.work == 2 * 5 * 4  # sampling only, now that the statistics exist


def test_one_calibration_at_a_time_and_a_stopped_run_gives_its_lane_back(app, conditional_model_dir):
    plan = app.plan_run(settings(conditional_model_dir))
    first = app.stream_run(plan)
    assert isinstance(next(first), app.Calibrating)  # it holds the lane now
    with pytest.raises(Busy, match="calibration is running"):
        next(app.stream_run(app.plan_run(settings(conditional_model_dir, seed=1))))
    first.close()  # the visitor stops: the worker ends at its next step and releases the lane
    assert app._calibration_lane.acquire(timeout=120)
    app._calibration_lane.release()


def test_a_progress_callback_that_raises_cancelled_stops_calibration(conditional_model_dir):
    from d2dpm.experiment import CompareConfig

    steps = []

    def stop_after_two(fraction, message):
        steps.append(message)
        if len(steps) == 2:
            raise Cancelled("stopped")

    with pytest.raises(Cancelled):
        Workbench().compare(CompareConfig(model=str(conditional_model_dir), steps=6, calib_samples=4, num_images=1, backbone="rtn"),
                            progress=stop_after_two)
    assert len(steps) == 2
