"""The toy mixture, ToyEpsMLP as a diffusers model, and `d2dpm train` end to end on toy2d (CPU, a few steps)."""

import math

import pytest
import torch

from d2dpm.models import load_model
from d2dpm.toy import TOY_RING_MODES, TOY_RING_RADIUS, TOY_SCALE, ToyEpsMLP, sample_toy2d, toy2d_log_density
from d2dpm.tools.train import main as train_main


@pytest.mark.parametrize("input_frequencies", [0, 6])
def test_toy_mlp_save_load_round_trips_bit_identically(tmp_path, input_frequencies):
    torch.manual_seed(0)
    network = ToyEpsMLP(hidden_size=64, num_layers=3, input_frequencies=input_frequencies).eval()
    network.save_pretrained(tmp_path, safe_serialization=True)
    loaded = ToyEpsMLP.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    assert loaded.config.hidden_size == 64 and loaded.config.num_layers == 3
    assert loaded.config.input_frequencies == input_frequencies
    # The first layer sees (x, y), their sin/cos at each frequency, and the time embedding.
    assert loaded.mlp[0].in_features == 2 * (1 + 2 * input_frequencies) + 64
    x, t = torch.randn(16, 2), torch.randint(0, 1000, (16,))
    with torch.no_grad():
        assert torch.equal(network(x, t).sample, loaded(x, t).sample)
        # A scalar timestep means the same step for every point.
        assert torch.equal(network(x, 7).sample, network(x, torch.full((16,), 7)).sample)


def test_toy_mlp_refuses_class_labels():
    with pytest.raises(ValueError, match="unconditional"):
        ToyEpsMLP()(torch.randn(2, 2), 5, class_labels=torch.zeros(2, dtype=torch.long))


def test_train_three_steps_on_toy2d_writes_a_loadable_folder(tmp_path):
    out = train_main(["--dataset", "toy2d", "--out", str(tmp_path / "toy"), "--steps", "3", "--batch-size", "64",
                      "--device", "cpu", "--log", str(tmp_path / "train.log")])
    model = load_model(str(out))
    assert model.kind == "points" and model.sample_shape == (2,) and not model.conditional
    assert model.meta["training"]["steps"] == 3 and model.meta["training"]["command"].startswith("d2dpm train")
    assert (out / "checkpoint" / "training_state.pt").is_file() and (out / "training_log.csv").is_file()
    with torch.no_grad():
        assert model.network(torch.randn(5, 2), 500).sample.shape == (5, 2)


def test_toy2d_follows_its_construction():
    points, components = sample_toy2d(40000, torch.Generator().manual_seed(0), return_components=True)
    assert points.shape == (40000, 2)
    assert abs(points.mean(0)).max() < 0.03 and abs(points.var(0).mean() - 1.0) < 0.03
    ring = components < TOY_RING_MODES
    assert abs(ring.float().mean() - 0.5) < 0.01
    assert abs(points[ring].norm(dim=1).mean() - TOY_RING_RADIUS * TOY_SCALE) < 0.02
    # The 8 ring modes sit at multiples of 45°.
    angles = torch.atan2(points[ring, 1], points[ring, 0])
    offset = torch.remainder(angles + math.pi / 8, math.pi / 4) - math.pi / 8
    assert offset.abs().mean() < 0.1


def test_toy2d_density_integrates_to_one_and_is_seeded():
    grid = torch.linspace(-4, 4, 401)
    xs, ys = torch.meshgrid(grid, grid, indexing="ij")
    density = toy2d_log_density(torch.stack([xs.flatten(), ys.flatten()], 1)).exp()
    assert abs(density.sum().item() * (grid[1] - grid[0]).item() ** 2 - 1.0) < 1e-3
    first = sample_toy2d(10, torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_toy2d(10, torch.Generator().manual_seed(3)))
