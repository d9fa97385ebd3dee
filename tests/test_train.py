"""`d2dpm train`: class-balanced drawing, the time-aware cool-down, and an image run end to end."""

import argparse
import json

import pytest
import torch

from d2dpm.cli import main as cli_main
from d2dpm.errors import ConfigError
from d2dpm.models import ASSETS_DIR, load_model
from d2dpm.tools.arguments import TRAIN_DEFAULTS
from d2dpm.tools.train import TrainingData, image_unet, learning_rate, main as train_main, steps_left


def test_balanced_drawing_makes_every_class_equally_likely():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2])  # 90 % / 9 % / 1 % of the images
    data = TrainingData("t", "image", [1, 2, 2], torch.zeros(100, 1, 2, 2), labels, ["a", "b", "c"], balance_classes=True)
    generator = torch.Generator().manual_seed(0)
    _, drawn = data.batch(30000, generator, generator, torch.device("cpu"))
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    # Binomial spread of each share is 0.0027 here: 0.015 is over 5σ.
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.015), share
    plain = TrainingData("t", "image", [1, 2, 2], torch.zeros(100, 1, 2, 2), labels, ["a", "b", "c"])
    _, drawn = plain.batch(30000, generator, generator, torch.device("cpu"))
    assert abs((drawn == 0).float().mean().item() - 0.9) < 0.015


def test_time_limit_moves_the_cooldown_to_the_end_of_the_allowed_time():
    args = argparse.Namespace(lr=1e-3, steps=100_000, cooldown_steps=1000, max_minutes=10.0)
    # 2000 steps in the first 5 of 10 minutes: about 2000 more fit, so the rate is still full...
    assert steps_left(args, 2000, 0, 300.0) == 2000
    assert learning_rate(args, 2000, steps_left(args, 2000, 0, 300.0)) == pytest.approx(1e-3)
    # ...half-way through the cool-down with 500 steps' time left, at 0 once the time is up.
    assert learning_rate(args, 3500, steps_left(args, 3500, 0, 525.0)) == pytest.approx(0.5e-3)
    assert learning_rate(args, 4000, steps_left(args, 4000, 0, 601.0)) == 0.0
    # Without a time limit only --steps counts.
    args.max_minutes = None
    assert steps_left(args, 2000, 0, 300.0) == 98_000


def test_train_two_steps_on_emoji_records_width_and_balance(tmp_path):
    out = train_main(["--dataset", "emoji", "--out", str(tmp_path / "emoji"), "--steps", "2", "--batch-size", "8",
                      "--channels", "8,16,32,32", "--balance-classes", "--device", "cpu"])
    model = load_model(str(out))
    assert tuple(model.network.config.block_out_channels) == (8, 16, 32, 32)
    training = json.loads((out / "d2dpm_model.json").read_text())["training"]
    assert training["balance_classes"] is True
    assert "--channels 8,16,32,32 --balance-classes" in training["command"]


TINY_EMOJI = ["--dataset", "emoji", "--batch-size", "8", "--channels", "8,16,32,32", "--device", "cpu"]


def _weights(folder):
    return load_model(str(folder)).network.state_dict()


def test_resume_continues_the_step_count_and_records_the_earlier_command(tmp_path):
    first = train_main([*TINY_EMOJI, "--out", str(tmp_path / "a"), "--steps", "2"])
    second = train_main([*TINY_EMOJI, "--out", str(tmp_path / "b"), "--steps", "3", "--resume", str(first)])
    training = json.loads((second / "d2dpm_model.json").read_text())["training"]
    assert training["steps"] == 3 and "--resume" in training["command"]
    assert training["earlier_commands"] == [json.loads((first / "d2dpm_model.json").read_text())["training"]["command"]]


def test_init_from_starts_a_new_run_from_a_models_weights(tmp_path):
    first = train_main([*TINY_EMOJI, "--out", str(tmp_path / "a"), "--steps", "2"])
    # Another seed draws other initial weights, and a learning rate of 1e-12 barely moves them: started
    # from `first`, the new model must still be `first`; started from scratch, it is not.
    tiny_step = ["--steps", "1", "--lr", "1e-12", "--seed", "1"]
    again = train_main([*TINY_EMOJI, "--out", str(tmp_path / "b"), *tiny_step, "--init-from", str(first)])
    fresh = train_main([*TINY_EMOJI, "--out", str(tmp_path / "c"), *tiny_step])
    start, continued, scratch = _weights(first), _weights(again), _weights(fresh)
    assert all(torch.allclose(continued[name], start[name], atol=1e-6) for name in start)
    assert not all(torch.allclose(scratch[name], start[name], atol=1e-3) for name in start)
    training = json.loads((again / "d2dpm_model.json").read_text())["training"]
    assert training["steps"] == 1 and f"--init-from {first}" in training["command"]
    assert training["initialised_from"]["steps"] == 2 and "--steps 2" in training["initialised_from"]["command"]
    # A third cycle from the second keeps the whole lineage: the first run's command is still on record.
    third = train_main([*TINY_EMOJI, "--out", str(tmp_path / "d"), *tiny_step, "--init-from", str(again)])
    lineage = json.loads((third / "d2dpm_model.json").read_text())["training"]["initialised_from"]
    assert lineage["folder"] == str(again) and lineage["initialised_from"]["command"] == training["initialised_from"]["command"]


def test_init_from_refuses_another_architecture_or_a_resume(tmp_path, capsys):
    first = train_main([*TINY_EMOJI, "--out", str(tmp_path / "a"), "--steps", "1"])
    with pytest.raises(ConfigError, match="same architecture"):
        train_main([*TINY_EMOJI, "--out", str(tmp_path / "b"), "--steps", "1", "--channels", "16,32,32,32", "--init-from", str(first)])
    with pytest.raises(ConfigError, match="not together with --resume"):
        train_main([*TINY_EMOJI, "--out", str(tmp_path / "b"), "--steps", "2", "--init-from", str(first), "--resume", str(first)])
    assert cli_main(["train", *TINY_EMOJI, "--out", str(tmp_path / "b"), "--steps", "1", "--init-from", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert "--init-from: got" in error and "Traceback" not in error


def test_bad_channels_are_refused_with_the_rule(tmp_path, capsys):
    with pytest.raises(ConfigError, match="the last two multiples of 32"):
        train_main(["--dataset", "emoji", "--out", str(tmp_path / "e"), "--steps", "1", "--channels", "16,32,96"])
    # The command line prints one line naming the flag and exits 2, as for every bad input.
    assert cli_main(["train", "--dataset", "emoji", "--out", str(tmp_path / "e"), "--channels", "16,32,48,64"]) == 2
    error = capsys.readouterr().err
    assert "--channels: got '16,32,48,64'" in error and "Traceback" not in error


@pytest.mark.parametrize("dataset", ["emoji", "fashion"])
def test_default_settings_rebuild_the_shipped_architecture(dataset):
    shipped = load_model(dataset).network.config
    channels = tuple(int(c) for c in TRAIN_DEFAULTS[dataset]["channels"].split(","))
    built = image_unet(shipped.in_channels, shipped.num_class_embeds - 1, channels).config
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
                "norm_num_groups", "num_class_embeds"):
        assert _plain(built[key]) == _plain(shipped[key]), key
    training = json.loads((ASSETS_DIR / "models" / dataset / "d2dpm_model.json").read_text())["training"]
    assert TRAIN_DEFAULTS[dataset]["balance_classes"] == bool(training.get("balance_classes"))


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def test_weight_average_warms_up_so_the_initial_weights_fade_at_once():
    from d2dpm.tools.train import WeightAverage

    network = torch.nn.Linear(2, 2)
    average = WeightAverage(network, decay=0.9995)
    start = network.weight.detach().clone()
    with torch.no_grad():
        network.weight.add_(1.0)
    average.update()  # first update: decay min(0.9995, 1/10) keeps only 10 % of the old weights
    assert torch.allclose(average.module.weight, start + 0.9)
    for _ in range(2000):
        average.update()
    assert torch.allclose(average.module.weight, network.weight, atol=1e-6)  # not 0.9995^2000 = 37 % of the start
