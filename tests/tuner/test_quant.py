import pytest
import torch

from tuner.errors import InvalidArgumentError
from tuner.quant import INT8, UINT8, compute_qparams, dequantize, fake_quantize, quantize, weight_qparams

SEED = torch.tensor([[191.6, -13.5, 728.6], [92.14, 295.5, -184.0], [0.0, 684.6, 245.5]])


def test_affine_int8_seed_example_to_the_digit():
    qp = compute_qparams(SEED.min(), SEED.max(), symmetric=False, qtype=INT8)
    assert qp.scale.item() == pytest.approx(3.5788234, abs=1e-6)
    assert qp.zero_point.item() == -77
    q = quantize(SEED, qp)
    assert q.tolist() == [[-23, -81, 127], [-51, 6, -128], [-77, 114, -8]]
    mse = torch.mean((dequantize(q, qp) - SEED) ** 2).item()
    assert mse == pytest.approx(1.57297, abs=1e-4)


def test_symmetric_int8_seed_example():
    x = torch.tensor([-2.5, -1.0, 0.0, 1.0, 3.5])
    qp = compute_qparams(x.min(), x.max(), symmetric=True)
    assert qp.scale.item() == pytest.approx(3.5 / 127)
    assert quantize(x, qp).tolist() == [-91, -36, 0, 36, 127]


def test_rounding_is_half_to_even_and_saturating_like_onnx():
    qp = compute_qparams(-128.0, 127.0, symmetric=False, qtype=INT8)  # scale 1, zero point 0
    assert qp.scale.item() == 1.0 and qp.zero_point.item() == 0
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0])
    assert quantize(x, qp).tolist() == [0, 2, 2, 0, -2, 127, -128]


def test_zero_is_exact_even_when_the_range_excludes_it():
    for lo, hi in [(0.3, 5.0), (-7.0, -0.1), (-1.3, 2.9)]:
        qp = compute_qparams(lo, hi, symmetric=False, qtype=UINT8)
        assert fake_quantize(torch.tensor([0.0]), qp).item() == 0.0
        assert 0 <= qp.zero_point.item() <= 255


def test_constant_zero_tensor_gets_a_usable_scale():
    qp = compute_qparams(0.0, 0.0, symmetric=False, qtype=UINT8)
    assert qp.scale.item() == 1.0
    assert fake_quantize(torch.zeros(3), qp).tolist() == [0.0, 0.0, 0.0]


def test_per_channel_beats_per_tensor_on_channels_of_different_scale():
    torch.manual_seed(0)
    w = torch.randn(4, 16) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    per_tensor = weight_qparams(w, "per_tensor")
    per_channel = weight_qparams(w, "per_channel")
    assert per_channel.scale.shape == (4,) and per_channel.axis == 0
    # the small channels are crushed to zero per tensor, kept per channel
    err_t = torch.mean((fake_quantize(w, per_tensor)[:2] - w[:2]) ** 2)
    err_c = torch.mean((fake_quantize(w, per_channel)[:2] - w[:2]) ** 2)
    assert err_c < err_t / 100
    # each channel's largest magnitude maps to +-127
    assert quantize(w, per_channel).abs().amax(1).tolist() == [127, 127, 127, 127]


def test_per_group_blocks_along_the_input_dimension():
    w = torch.randn(3, 64)
    qp = weight_qparams(w, "per_group", group_size=32)
    assert qp.scale.shape == (3, 2)
    assert torch.allclose(fake_quantize(w, qp), w, atol=qp.scale.max().item())
    with pytest.raises(InvalidArgumentError, match="multiple of `group_size`"):
        weight_qparams(torch.randn(3, 10), "per_group", group_size=32)


def test_bad_arguments_name_the_rule():
    with pytest.raises(InvalidArgumentError, match="lo <= hi"):
        compute_qparams(2.0, 1.0, symmetric=False)
    with pytest.raises(InvalidArgumentError, match="granularity"):
        weight_qparams(torch.randn(2, 2), "per_row")


def test_a_simulated_int8_convs_bias_sits_on_the_runtimes_int32_grid(digits_model, digits_batches):
    """ONNX Runtime adds a QLinearConv's bias to the int32 accumulator, in steps of input scale x
    weight scale: the simulation rounds it the same way (a Linear keeps its float bias: the export
    adds it after QGemm / MatMulIntegerToFloat, in float)."""
    from tuner import LayerConfig, apply_plan, calibrate
    from tuner.qmodules import QuantizedLayer

    calibration = calibrate(digits_model, digits_batches)
    model = apply_plan(digits_model, calibration.uniform_plan(LayerConfig(weights="per_channel")), calibration)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    conv = layers["conv2"]
    step = conv.act_qparams.scale.float() * conv.weight_qparams.scale.reshape(-1).float()
    codes = conv.layer.bias / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    original = dict(digits_model.named_modules())["conv2"].bias
    assert not torch.equal(conv.layer.bias, original) and (conv.layer.bias - original).abs().max() <= step.max() / 2 + 1e-7
    assert torch.equal(layers["fc1"].layer.bias, dict(digits_model.named_modules())["fc1"].bias)
