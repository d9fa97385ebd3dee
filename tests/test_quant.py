"""Fake quantization: the reference formula, monotone error, FP untouched, safe concurrency, efficiency."""

import threading

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from conftest import tiny_unet
from d2dpm.errors import ConfigError
from d2dpm.quant import ActivationObserver, QuantConfig, count_macs, efficiency, fake_quantize_weight, quantize_network, weight_grid


def calibrated_quantized(network, config, inputs):
    observer = ActivationObserver(network)
    with observer, torch.no_grad():
        for args in inputs:
            network(*args)
    return quantize_network(network, observer.round_to_nearest(config)), observer


def nearest(weight, bits, range_method):
    return fake_quantize_weight(weight, bits, *weight_grid(weight, bits, range_method))


def unet_inputs(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=generator), torch.full((4,), t)) for t in torch.linspace(900, 50, count).long()]


def test_weight_quantization_matches_the_affine_formula():
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    bits = 4
    quantized = nearest(weight, bits, "minmax")
    flat = weight.reshape(4, -1)
    low, high = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
    scale = (high - low) / (2**bits - 1)
    zero = torch.round(-low / scale)
    # x_int = clamp(round(x/s) + z, 0, 2^b − 1);  x̃ = s·(x_int − z)
    integer = torch.clamp(torch.round(flat / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    expected = scale[:, None] * (integer - zero[:, None])
    assert torch.allclose(quantized.reshape(4, -1), expected, atol=1e-6)
    assert all(len(torch.unique(row)) <= 2**bits for row in quantized.reshape(4, -1))


def test_mse_range_beats_minmax_on_heavy_tailed_weights():
    torch.manual_seed(0)
    weight = torch.distributions.Laplace(0.0, 1.0).sample((16, 256))  # long tails stretch the min-max grid
    errors = {m: float((nearest(weight, 3, m) - weight).pow(2).mean()) for m in ("minmax", "mse")}
    assert errors["mse"] < 0.8 * errors["minmax"]


def test_network_error_shrinks_as_bits_grow_and_16_32_bits_are_exact():
    unet = tiny_unet()
    inputs = unet_inputs()
    x, t = unet_inputs(1, seed=9)[0]
    with torch.no_grad():
        reference = unet(x, t).sample
    errors = {}
    for w_bits, a_bits in [(2, 4), (4, 6), (6, 8), (8, 8), (16, 16), (32, 32)]:
        quantized, _ = calibrated_quantized(unet, QuantConfig(w_bits, a_bits, keep_edge_layers_8bit=False), inputs)
        with torch.no_grad():
            errors[(w_bits, a_bits)] = float((quantized(x, t).sample - reference).pow(2).mean() / reference.pow(2).mean())
    assert errors[(2, 4)] > errors[(4, 6)] > errors[(6, 8)] > errors[(8, 8)] > 0
    assert errors[(16, 16)] == 0.0 and errors[(32, 32)] == 0.0


def test_quantize_leaves_the_fp_network_untouched_and_both_run_concurrently():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    quantized, _ = calibrated_quantized(unet, QuantConfig(4, 6), unet_inputs())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    x, t = unet_inputs(1, seed=3)[0]
    with torch.no_grad():
        expected = {"fp": unet(x, t).sample, "q": quantized(x, t).sample}
    results, errors = {}, []

    def run(name, network):
        try:
            with torch.no_grad():
                for _ in range(5):
                    out = network(x, t).sample
                    if not torch.equal(out, expected[name]):
                        errors.append(name)
            results[name] = out
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=("fp", unet)), threading.Thread(target=run, args=("q", quantized))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert not torch.equal(results["fp"], results["q"])


def test_first_and_last_layers_stay_at_8_bits():
    unet = tiny_unet()
    _, observer = calibrated_quantized(unet, QuantConfig(4, 6), unet_inputs(1))
    quantizer = observer.round_to_nearest(QuantConfig(4, 6))
    bits = quantizer.bits
    assert bits["conv_in"] == (8, 32) and bits["conv_out"] == (8, 8)  # the network's own input x_t stays in float
    assert quantizer.layers["conv_in"].input_grid == [] and quantizer.layers["conv_out"].input_grid
    assert bits["time_embedding.linear_1"] == (4, 6)
    assert observer.round_to_nearest(QuantConfig(4, 6, keep_edge_layers_8bit=False)).bits["conv_in"] == (4, 6)


def test_a_pixel_far_outside_the_calibrated_range_reaches_the_first_layer_unclipped():
    """A drifting x_t pixel must reach conv_in as it is, or ε̂ could never pull it back."""
    unet = tiny_unet()
    quantized, _ = calibrated_quantized(unet, QuantConfig(8, 8), unet_inputs(1))
    x = torch.randn(1, 3, 8, 8)
    x[0, 0, 3, 3] = 60.0  # calibration saw |x| of a few units at most
    layer = quantized.conv_in
    with torch.no_grad():
        expected = layer.inner._conv_forward(x, layer.weight, layer.bias)
        assert torch.equal(layer(x), expected)


def test_conditional_unet_and_plain_modules_quantize():
    torch.manual_seed(0)
    cross = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                 cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4).eval()
    text = torch.randn(2, 5, 16)
    inputs = [(torch.randn(2, 3, 8, 8), torch.tensor([500, 500]), text)]
    quantized, _ = calibrated_quantized(cross, QuantConfig(8, 8), inputs)
    with torch.no_grad():
        a, b = cross(*inputs[0]).sample, quantized(*inputs[0]).sample
    assert 0 < float((a - b).pow(2).mean() / a.pow(2).mean()) < 0.05

    mlp = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2)).eval()
    quantized, _ = calibrated_quantized(mlp, QuantConfig(8, 8), [(torch.randn(64, 2),)])
    x = torch.randn(8, 2)
    with torch.no_grad():
        assert 0 < float((mlp(x) - quantized(x)).abs().max()) < 0.1


def test_efficiency_counts_size_and_bops_by_hand():
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    _, observer = calibrated_quantized(network, QuantConfig(4, 8, keep_edge_layers_8bit=False), [(torch.randn(2, 3, 4, 4),)])
    bits = observer.round_to_nearest(QuantConfig(4, 8, keep_edge_layers_8bit=False)).bits
    macs = count_macs(network, lambda: network(torch.randn(1, 3, 4, 4)))
    conv_macs, linear_macs = 8 * 4 * 4 * 3 * 9, 10 * 128
    assert macs == {"0": conv_macs, "2": linear_macs}
    result = efficiency(network, macs, bits, batch=1)
    params = 8 * 27 + 8 + 10 * 128 + 10
    weights = 8 * 27 + 10 * 128
    megabyte = 8 * 1024 * 1024
    assert result.fp_size_mb == pytest.approx(params * 32 / megabyte)
    assert result.q_size_mb == pytest.approx((params * 32 - weights * 28) / megabyte)
    assert result.fp_gbops == pytest.approx(2 * (conv_macs + linear_macs) * 32 * 32 / 1e9)
    assert result.q_gbops == pytest.approx(2 * (conv_macs + linear_macs) * 4 * 8 / 1e9)
    assert result.bop_ratio == pytest.approx(32)


@pytest.mark.parametrize("w_bits, a_bits, argument", [(1, 8, "w_bits"), (9, 8, "w_bits"), (4, 3, "a_bits"), (4, 12, "a_bits")])
def test_bits_out_of_range_are_refused(w_bits, a_bits, argument):
    with pytest.raises(ConfigError) as refused:
        QuantConfig(w_bits, a_bits)
    assert refused.value.argument == argument and "16, 32" in refused.value.allowed


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_fast_activation_quantizer_matches_torch_fake_quantize(bits):
    from d2dpm.quant import quantize_activation

    x = torch.randn(8, 16, 16, 16, generator=torch.Generator().manual_seed(bits)) * 3
    levels = 2**bits - 1
    for scale, zero in [(0.05, 3), (0.37, levels // 2), (0.011, 0), (0.2, levels)]:
        reference = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, levels)
        fast = quantize_activation(x, scale, zero, bits)
        differs = fast != reference
        # The two kernels may round an exact half-step tie differently (x·(1/s) vs x/s): at most one
        # level, on a vanishing fraction of elements.
        assert differs.float().mean() < 1e-3
        assert torch.allclose(fast[differs], reference[differs], atol=scale * 1.001, rtol=0)
        assert len(torch.unique(fast)) <= levels + 1


def test_activation_quantizer_keeps_the_channels_last_layout_and_takes_any_strides():
    """A channels-last input stays channels-last (no copy before the next convolution), and a
    channel slice of it (one half of a split input) quantizes as its contiguous copy does."""
    from d2dpm.quant import quantize_activation

    x = (torch.randn(6, 24, 8, 8, generator=torch.Generator().manual_seed(0)) * 3).contiguous(memory_format=torch.channels_last)
    quantized = quantize_activation(x, 0.05, 128, 8)
    assert quantized.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(quantized, quantize_activation(x.contiguous(), 0.05, 128, 8))
    half = x[:, 10:]
    assert torch.equal(quantize_activation(half, 0.05, 128, 8), quantize_activation(half.contiguous(), 0.05, 128, 8))
