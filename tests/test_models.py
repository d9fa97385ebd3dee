"""Loading diffusers models from folders and hub ids, offline."""

import json

import pytest
import torch

from conftest import save_pipeline_folder, tiny_unet
from d2dpm.errors import ConfigError
from d2dpm.experiment import CompareConfig, Workbench
from d2dpm.models import load_model


def test_pipeline_folder_loads_and_compares(pipeline_model_dir):
    model = load_model(str(pipeline_model_dir))
    assert model.kind == "image" and model.sample_shape == (3, 8, 8) and not model.conditional
    result = Workbench().compare(CompareConfig(model=str(pipeline_model_dir), steps=4, num_images=2, calib_samples=4, methods=("q", "d-d2"),
                                                     backbone="rtn"))
    assert result.samples["d-d2"].shape == (2, 3, 8, 8)
    assert result.config.guidance == 1.0  # unconditional: no guidance


def test_identity_changes_with_the_weights_or_the_schedule_not_the_diffusers_version(tmp_path):
    # Statistics are keyed by the identity: a new schedule must not reuse statistics of the old one.
    identities = {}
    for variant in ("base", "resaved", "schedule", "weights"):
        folder = save_pipeline_folder(tmp_path / variant, seed=1 if variant == "weights" else 0)
        config_path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(config_path.read_text())
        if variant == "resaved":
            config["_diffusers_version"] = "0.0.1"
        if variant == "schedule":
            config["beta_end"] = 0.03
        config_path.write_text(json.dumps(config))
        identities[variant] = load_model(str(folder)).identity.split("@")[1]
    assert identities["resaved"] == identities["base"]
    assert len({identities["base"], identities["schedule"], identities["weights"]}) == 3


def test_bare_unet_folder_loads_with_the_default_scheduler(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.scheduler_config["num_train_timesteps"] == 1000
    x = torch.zeros(1, 3, 8, 8)
    with torch.no_grad():
        assert model.network(x, torch.tensor([10])).sample.shape == x.shape


def test_foreign_class_conditional_unet_is_refused_clearly(tmp_path):
    tiny_unet(num_class_embeds=5).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unconditional"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_gives_a_clear_error():
    # HF_HUB_OFFLINE=1 (conftest): the hub cannot be reached, as on a machine with no network.
    with pytest.raises(ConfigError) as refused:
        load_model("google/ddpm-cifar10-32-not-cached")
    assert refused.value.argument == "model" and "hub id could not be fetched" in str(refused.value)


def test_guidance_on_an_unconditional_model_is_refused(pipeline_model_dir):
    with pytest.raises(ConfigError) as refused:
        Workbench().compare(CompareConfig(model=str(pipeline_model_dir), guidance=3.0, steps=4, num_images=1, calib_samples=4,
                                                  backbone="rtn"))
    assert refused.value.argument == "guidance"


def test_folder_without_a_model_is_refused(tmp_path):
    (tmp_path / "notes.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="holds no diffusers model"):
        load_model(str(tmp_path))


def test_a_large_cpu_batch_runs_in_chunks_with_the_same_guided_output(monkeypatch):
    """NoisePredictor splits a CPU batch above CPU_FORWARD_CHUNK into equal chunks; every sample's ε
    is the one its own forward gives (to float rounding), with its own label and the guidance."""
    from d2dpm import models
    from d2dpm.models import NoisePredictor

    network = tiny_unet(num_class_embeds=4).to(memory_format=torch.channels_last).eval()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10) % 3
    whole = NoisePredictor(network, 3)(x, 500, labels, 2.5)
    calls = []
    network.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(models, "CPU_FORWARD_CHUNK", 4)
    chunked = NoisePredictor(network, 3)(x, 500, labels, 2.5)
    assert calls == [4, 4, 4, 4, 4]  # [x; x] is 20 samples: five equal chunks of 4
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_calibration_trajectories_run_one_forward_per_step_on_the_cpu(monkeypatch, pipeline_model_dir):
    """The calibration's observer keeps a fixed number of input values per forward: its FP trajectories
    must not be split into CPU chunks (or a CPU calibration would sample more values than a GPU one)."""
    from d2dpm import models
    from d2dpm.calibration import fp_trajectories
    from d2dpm.schedule import DDIMSchedule

    model = load_model(str(pipeline_model_dir))
    monkeypatch.setattr(models, "CPU_FORWARD_CHUNK", 2)
    calls = []
    model.network.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    fp_trajectories(model, DDIMSchedule(model.scheduler_config, 3, 0.0), 5, 0, 1.0, "cpu")
    assert calls == [5, 5, 5]
