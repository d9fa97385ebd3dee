"""The workbench: statistics cache, concurrency, streaming."""

import threading

import torch

from d2dpm.experiment import CompareConfig, CompareProgress, ComparisonResult, Workbench
from d2dpm.models import load_model

FAST = dict(steps=5, num_images=2, calib_samples=8, methods=("q", "d-d2"), backbone="rtn")


def test_statistics_are_cached_on_disk_and_a_corrupted_entry_is_recalibrated(conditional_model_dir, tmp_path):
    config = CompareConfig(model=str(conditional_model_dir), **FAST)
    first = Workbench(cache_dir=tmp_path).compare(config)
    assert first.stats_source == "calibrated"
    cached = list((tmp_path / "stats").glob("*.safetensors"))
    assert len(cached) == 1

    second = Workbench(cache_dir=tmp_path).compare(config)
    assert second.stats_source == "cache"
    assert torch.equal(first.samples["d-d2"], second.samples["d-d2"])

    cached[0].write_bytes(b"\x00" * 64)  # corrupted on disk
    third = Workbench(cache_dir=tmp_path).compare(config)
    assert third.stats_source == "calibrated"
    assert torch.equal(first.samples["d-d2"], third.samples["d-d2"])


def test_concurrent_comparisons_are_independent_and_repeatable(conditional_model_dir, tmp_path):
    workbench = Workbench(cache_dir=tmp_path)
    configs = [CompareConfig(model=str(conditional_model_dir), seed=seed, eta=1.0, **FAST) for seed in (1, 2, 1)]
    alone = [Workbench(cache_dir=tmp_path / "alone").compare(c).samples["d-d2"] for c in configs]
    results, errors = [None] * 3, []

    def run(index):
        try:
            results[index] = workbench.compare(configs[index]).samples["d-d2"]
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for together, separate in zip(results, alone):
        assert torch.equal(together, separate)
    assert torch.equal(results[0], results[2]) and not torch.equal(results[0], results[1])


def test_iter_compare_streams_one_progress_per_step_then_the_result(conditional_model_dir, tmp_path):
    events = list(Workbench(cache_dir=tmp_path).iter_compare(CompareConfig(model=str(conditional_model_dir), **FAST)))
    assert [e.step for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert all(isinstance(e, CompareProgress) and set(e.x0) == {"fp", "q", "d-d2"} for e in events[:-1])
    assert isinstance(events[-1], ComparisonResult)
    assert torch.equal(events[-2].x0["d-d2"], events[-1].records[-1]["d-d2"].x0)


def test_the_default_count_draws_every_class_once(conditional_model_dir, pipeline_model_dir):
    conditional = load_model(str(conditional_model_dir))
    assert CompareConfig(model=str(conditional_model_dir)).validated(conditional).num_images == conditional.num_classes == 3
    assert CompareConfig(model=str(conditional_model_dir), num_images=5).validated(conditional).num_images == 5
    unconditional = load_model(str(pipeline_model_dir))
    assert not unconditional.conditional
    assert CompareConfig(model=str(pipeline_model_dir)).validated(unconditional).num_images == 8
    images = Workbench().compare(CompareConfig(model=str(conditional_model_dir), **{**FAST, "num_images": None}))
    assert images.samples["q"].shape[0] == 3 and images.config.num_images == 3
