"""The PTQ backbones: bias correction (for all steps and per step) and AdaRound on single layers with
random data, split quantization of a UNet's skip concatenations, and the quantizer's exact round trip
through a file."""

import dataclasses
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_unet
from d2dpm.errors import ConfigError
from d2dpm.quant import (ActivationObserver, QuantConfig, Quantizer, concat_splits, learn_rounding, mean_error_per_channel,
                         quantize_network, reconstruct)


def calibrate(layer, x, config):
    with ActivationObserver(layer) as observer, torch.no_grad():
        layer(x)
    return observer.round_to_nearest(config)


def conv_and_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(8, 6, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.2)
        layer.bias.copy_(torch.randn(6, generator=generator) * 0.1)
    x = torch.relu(torch.randn(64, 8, 6, 6, generator=generator) + 0.5)  # one-sided, like post-SiLU features
    return layer.eval(), x


def linear_and_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(24, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.3)
    return layer.eval(), torch.randn(256, 24, generator=generator) + 0.3


@pytest.mark.parametrize("make", [conv_and_data, linear_and_data])
def test_bias_correction_removes_the_mean_output_error_per_channel(make):
    layer, x = make()
    rtn = calibrate(layer, x, QuantConfig(3, 4, keep_edge_layers_8bit=False, backbone="rtn"))
    corrected = reconstruct(layer, rtn, lambda net, args: net(*args), (x,), learn_rounding_too=False)
    with torch.no_grad():
        reference = layer(x)
        before = mean_error_per_channel(layer, quantize_network(layer, rtn)(x) - reference)
        after = mean_error_per_channel(layer, quantize_network(layer, corrected)(x) - reference)
    assert before.abs().max() > 1e-3  # 3-bit weights, 4-bit inputs: a clear bias to remove
    assert after.abs().max() < 1e-6 * (1 + reference.abs().max())


@pytest.mark.parametrize("make", [conv_and_data, linear_and_data])
def test_adaround_beats_nearest_and_stays_within_one_step(make):
    layer, x = make(seed=1)
    config = QuantConfig(3, 8, keep_edge_layers_8bit=False)
    rtn = calibrate(layer, x, config)
    spec = rtn.layers[""]
    with torch.no_grad():
        x_quantized = spec.quantize_input(x)
        target = layer(x) - (layer.bias.view(-1, 1, 1) if isinstance(layer, nn.Conv2d) else layer.bias)
        rounding = learn_rounding(layer, spec, x_quantized, target, iterations=400)
    nearest = spec.quantized_weight(layer.weight)
    spec.rounding_up = rounding
    learned = spec.quantized_weight(layer.weight)
    step = spec.weight_scale.view(-1, *[1] * (layer.weight.dim() - 1))
    assert ((learned - nearest).abs() <= step * 1.0001).all()
    assert not torch.equal(learned, nearest)  # it did change some roundings

    def output_mse(weight):
        with torch.no_grad():
            out = layer._conv_forward(x_quantized, weight, None) if isinstance(layer, nn.Conv2d) else x_quantized @ weight.T
            return float((out - target).pow(2).mean())

    assert output_mse(learned) < 0.9 * output_mse(nearest)


def test_split_points_match_the_unets_own_concatenations(monkeypatch):
    unet = tiny_unet()
    splits = concat_splits(unet)
    seen = []
    original_cat = torch.cat

    def recording_cat(tensors, dim=0, **kwargs):
        if dim == 1 and len(tensors) == 2 and tensors[0].dim() == 4:
            seen.append((tensors[0].shape[1], tensors[0].shape[1] + tensors[1].shape[1]))
        return original_cat(tensors, dim=dim, **kwargs)

    monkeypatch.setattr(torch, "cat", recording_cat)
    with torch.no_grad():
        unet(torch.randn(1, 3, 8, 8), torch.tensor([10]))
    monkeypatch.undo()
    conv1 = [(splits[name], unet.get_submodule(name).in_channels) for name in splits if name.endswith("conv1")]
    assert conv1 == seen and len(seen) == 4  # every resnet of both up blocks, in forward order


def test_adaround_backbone_splits_concat_inputs_and_round_trips_through_a_file(tmp_path):
    unet = tiny_unet()
    x, t = torch.randn(6, 3, 8, 8), torch.tensor([900, 700, 500, 300, 100, 10])
    with ActivationObserver(unet, splits=concat_splits(unet)) as observer, torch.no_grad():
        for row in range(6):  # one call per step, as the sampler calls it: per-step grids too
            unet(x[row:row + 1], t[row:row + 1])
    quantizer = observer.round_to_nearest(QuantConfig(4, 8))
    shortcut = quantizer.layers["up_blocks.0.resnets.0.conv_shortcut"]
    assert len(shortcut.input_grid) == 2 and sorted(shortcut.step_grids) == sorted(t.tolist())
    assert all(len(grid) == 2 for grid in shortcut.step_grids.values())
    fitted = reconstruct(unet, quantizer, lambda net, args: net(*args).sample, (x, t), learn_rounding_too=True, iterations=20)
    assert fitted.layers["down_blocks.0.resnets.0.conv1"].rounding_up is not None
    save_file(fitted.to_tensors(), str(tmp_path / "q.safetensors"))
    again = Quantizer.from_tensors("adaround", load_file(str(tmp_path / "q.safetensors")))
    with torch.no_grad():
        assert torch.equal(quantize_network(unet, fitted)(x, t).sample, quantize_network(unet, again)(x, t).sample)


def observed_per_step(unet, calls, config):
    with ActivationObserver(unet) as observer, torch.no_grad():
        for x, t in calls:
            unet(x, t)
    return observer.round_to_nearest(config)


def test_every_backbone_but_rtn_gets_an_input_grid_per_step_fitted_to_that_step_alone():
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(0)
    calls = [(torch.randn(2, 3, 8, 8, generator=generator) * scale, torch.full((2,), t)) for t, scale in [(900, 3.0), (20, 0.5)]]
    config = QuantConfig(8, 8, range_method="minmax", backbone="bias-correction")
    both = observed_per_step(unet, calls, config)
    name = "down_blocks.0.resnets.0.conv1"
    assert sorted(both.layers[name].step_grids) == [20, 900]
    for x, t in calls:  # with minmax, a step's grid is the grid of an observer that saw that step alone
        alone = observed_per_step(unet, [(x, t)], config)
        assert both.layers[name].step_grids[int(t[0])] == alone.layers[name].input_grid
    assert both.layers[name].step_grids[20] != both.layers[name].step_grids[900]
    assert not any(layer.step_grids for layer in observed_per_step(unet, calls, QuantConfig(8, 8, backbone="rtn")).layers.values())


def test_per_step_grids_follow_the_forward_timestep_per_sample_and_per_thread():
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(1)
    calls = [(torch.randn(2, 3, 8, 8, generator=generator) * scale, torch.full((2,), t)) for t, scale in [(900, 3.0), (500, 1.0), (20, 0.3)]]
    quantizer = observed_per_step(unet, calls, QuantConfig(4, 6, backbone="bias-correction"))
    quantized = quantize_network(unet, quantizer)
    x = torch.randn(3, 3, 8, 8, generator=generator)
    with torch.no_grad():
        alone = [quantized(x[i:i + 1], torch.tensor([t])).sample for i, t in enumerate([900, 500, 20])]
        mixed = quantized(x, torch.tensor([900, 500, 20])).sample  # each sample on its own step's grids
        assert torch.allclose(mixed, torch.cat(alone), atol=1e-5)
    layer = quantizer.layers["down_blocks.0.resnets.0.conv1"]  # a timestep never calibrated takes the nearest one's grid
    assert layer.grid_at(880) == layer.step_grids[900] and layer.grid_at(660) == layer.step_grids[500]
    assert layer.grid_at(0) == layer.step_grids[20] != layer.step_grids[900]

    results, errors = {}, []

    def run(t):  # threads at different steps share one network: each must see its own timestep
        try:
            with torch.no_grad():
                results[t] = [quantized(x[:1], torch.tensor([t])).sample for _ in range(20)]
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(t,)) for t in (900, 20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with torch.no_grad():
        for t in (900, 20):
            expected = quantized(x[:1], torch.tensor([t])).sample
            assert all(torch.equal(result, expected) for result in results[t])


class Stepped(nn.Module):
    """A single layer called the way the sampler calls a network: forward(x, timestep)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, timestep):
        return self.layer(x)


@pytest.mark.parametrize("make", [conv_and_data, linear_and_data])
def test_bias_correction_per_step_removes_each_steps_mean_error(make, tmp_path):
    layer, x = make(seed=2)
    # Two steps whose inputs differ in scale and offset, as a layer's inputs do over the sampling steps.
    steps = {900: x[: len(x) // 2] * 3.0 + 0.5, 20: x[len(x) // 2:] * 0.4}
    net = Stepped(layer)
    with ActivationObserver(net) as observer, torch.no_grad():
        for t, inputs in steps.items():
            net(inputs, torch.full((len(inputs),), t))
    rtn = observer.round_to_nearest(QuantConfig(3, 4, keep_edge_layers_8bit=False, backbone="bias-correction"))
    inputs_by_step = {t: (inputs, torch.full((len(inputs),), t)) for t, inputs in steps.items()}
    mixed = tuple(torch.cat(parts) for parts in zip(*inputs_by_step.values()))
    per_step = reconstruct(net, rtn, lambda network, args: network(*args), mixed, learn_rounding_too=False)
    assert sorted(per_step.layers["layer"].step_bias_corrections) == [20, 900]
    all_steps = Quantizer("bias-correction", {"layer": dataclasses.replace(per_step.layers["layer"], step_bias_corrections={})})

    def mean_errors(quantizer):
        with torch.no_grad():
            return {t: mean_error_per_channel(layer, quantize_network(net, quantizer)(*args) - layer(args[0]))
                    for t, args in inputs_by_step.items()}

    before, after = mean_errors(all_steps), mean_errors(per_step)
    with torch.no_grad():
        scale = 1 + max(float(layer(inputs).abs().max()) for inputs in steps.values())
    assert min(float(error.abs().max()) for error in before.values()) > 1e-3  # one correction for both steps misses each
    assert all(float(error.abs().max()) < 1e-5 * scale for error in after.values())

    quantized = quantize_network(net, per_step).to("cpu")  # a device move carries the per-step biases along
    mixed_x = torch.cat([steps[900][:3], steps[20][:3]])
    mixed_t = torch.tensor([900] * 3 + [20] * 3)
    with torch.no_grad():  # a batch mixing steps: each sample gets its own step's correction
        alone = torch.cat([quantized(mixed_x[:3], mixed_t[:3]), quantized(mixed_x[3:], mixed_t[3:])])
        assert torch.allclose(quantized(mixed_x, mixed_t), alone, atol=1e-6)
        # A timestep never calibrated takes the nearest calibrated one's correction.
        assert torch.equal(quantized(mixed_x[:3], torch.full((3,), 700)), quantized(mixed_x[:3], torch.full((3,), 900)))
        assert torch.equal(quantized(mixed_x[:3], torch.full((3,), 300)), quantized(mixed_x[:3], torch.full((3,), 20)))
        # Called outside a forward that carries a timestep, the layer uses the all-steps correction.
        assert torch.allclose(quantized.layer(mixed_x), quantize_network(net, all_steps).layer(mixed_x))
    save_file(per_step.to_tensors(), str(tmp_path / "q.safetensors"))
    again = Quantizer.from_tensors("bias-correction", load_file(str(tmp_path / "q.safetensors")))
    with torch.no_grad():
        assert torch.equal(quantize_network(net, again)(mixed_x, mixed_t), quantized(mixed_x, mixed_t))

    spec = per_step.layers["layer"]
    # Per-step corrections apply even where no layer has per-step input grids.
    no_grids = Quantizer("bias-correction", {"layer": dataclasses.replace(spec, step_grids={})})
    all_steps_no_grids = Quantizer("bias-correction", {"layer": dataclasses.replace(spec, step_grids={}, step_bias_corrections={})})
    with torch.no_grad():
        assert not torch.allclose(quantize_network(net, no_grids)(mixed_x, mixed_t),
                                  quantize_network(net, all_steps_no_grids)(mixed_x, mixed_t))
    # A file or quantizer whose corrections do not fit the network is refused, not half-applied.
    tensors = per_step.to_tensors()
    tensors["quant.layer.step_bias_timesteps"] = tensors["quant.layer.step_bias_timesteps"][:1]
    with pytest.raises(KeyError, match="rows for 1 timesteps"):
        Quantizer.from_tensors("bias-correction", tensors)
    wrong = {t: torch.cat([c, c]) for t, c in spec.step_bias_corrections.items()}
    with pytest.raises(ConfigError, match="another network"):
        quantize_network(net, Quantizer("bias-correction", {"layer": dataclasses.replace(spec, step_bias_corrections=wrong)}))
