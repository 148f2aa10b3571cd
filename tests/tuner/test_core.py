"""Calibration, plans and simulated INT8 on real models."""

import json

import pytest
import torch

from tuner import (
    FP32, CalibrationError, InvalidPlanError, LayerConfig, Plan, QuantizedLayer, apply_plan, calibrate, layer_report,
)
from tuner.examples import digits


def test_calibration_is_one_forward_pass_per_batch(digits_model, digits_batches):
    calls = []
    handle = digits_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        calib = calibrate(digits_model, digits_batches)
        for method in ("max", "percentile-99.99", "entropy", "mse"):  # every method, no new pass
            apply_plan(digits_model, calib.uniform_plan(LayerConfig(activation=method)), calib)
    finally:
        handle.remove()
    assert len(calls) == len(digits_batches)
    assert list(calib.layers) == ["conv1", "conv2", "fc1", "fc2"]
    assert all(info.macs > 0 for info in calib.layers.values())


def test_plan_json_round_trip_and_validation():
    plan = Plan({"conv1": LayerConfig("int8", "entropy", "symmetric", "per_tensor"), "fc2": FP32,
                 "fc1": LayerConfig(activation="max", smooth=0.5)})
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert json.loads(text)["version"] == 1
    assert plan.fp32_layers == ["fc2"] and plan.int8_layers == ["conv1", "fc1"]
    with pytest.raises(InvalidPlanError, match="activation"):
        Plan.from_dict({"layers": {"x": {"activation": "median"}}})
    with pytest.raises(InvalidPlanError, match="version"):
        Plan.from_dict({"version": 9, "layers": {}})
    with pytest.raises(InvalidPlanError, match="smooth"):
        LayerConfig(activation="mse", smooth=0.5)


def test_apply_plan_never_changes_the_callers_model(digits_model, digits_batches):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    x = digits_batches[0]
    reference = digits_model(x)
    calib = calibrate(digits_model, digits_batches)
    quantized = apply_plan(digits_model, calib.uniform_plan(), calib)
    assert isinstance(quantized.fc1, QuantizedLayer) and not isinstance(digits_model.fc1, QuantizedLayer)
    assert all(torch.equal(before[k], v) for k, v in digits_model.state_dict().items())
    assert torch.equal(digits_model(x), reference)
    assert not torch.equal(quantized(x), reference)  # INT8 really changed the numbers
    fallback = apply_plan(digits_model, calib.uniform_plan().fallback(["fc1"]), calib)
    assert isinstance(fallback.fc1, torch.nn.Linear) and not isinstance(fallback.fc1, QuantizedLayer)


def test_plans_choose_the_accuracy_on_the_outlier_example(digits_model, digits_batches):
    calib = calibrate(digits_model, digits_batches)
    baseline = digits.evaluate(digits_model)
    naive = digits.evaluate(apply_plan(digits_model, calib.uniform_plan(LayerConfig(weights="per_tensor")), calib))
    smooth = digits.evaluate(apply_plan(digits_model, calib.uniform_plan(LayerConfig(smooth=0.5)), calib))
    all_fp32 = digits.evaluate(apply_plan(digits_model, calib.uniform_plan().fallback(calib.layers), calib))
    assert naive < baseline - 20  # the planted outlier channel breaks per-tensor INT8
    assert smooth >= baseline * 0.99  # SmoothQuant migrates it into the weights
    assert all_fp32 == baseline


def test_unknown_layer_and_bad_calibration_are_clear_errors(digits_model, digits_batches):
    calib = calibrate(digits_model, digits_batches)
    with pytest.raises(InvalidPlanError, match="not quantizable layers of this model.*'head'"):
        apply_plan(digits_model, Plan({"head": LayerConfig()}), calib)
    with pytest.raises(CalibrationError, match="batch 0"):
        calibrate(digits_model, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(digits_model, [])
    with pytest.raises(CalibrationError, match="single Tensor"):
        calibrate(digits_model, torch.randn(2, 1, 8, 8))


def test_transformer_with_keyword_inputs_and_tuple_output_runs_under_a_plan(tiny_encoder, encoder_batches):
    calib = calibrate(tiny_encoder, encoder_batches)
    assert "head" in calib.layers and "layer.down" in calib.layers and len(calib.layers) == 6
    plan = calib.uniform_plan(LayerConfig(activation="mse"))
    quantized = apply_plan(tiny_encoder, plan, calib)
    out, hidden = quantized(**encoder_batches[0])
    ref_out, ref_hidden = tiny_encoder(**encoder_batches[0])
    assert out.shape == ref_out.shape and hidden.shape == ref_hidden.shape
    assert torch.allclose(out, ref_out, atol=0.1) and not torch.equal(out, ref_out)


def test_layer_report_measures_every_setting_and_coverage(digits_model, digits_batches):
    calib = calibrate(digits_model, digits_batches)
    report = layer_report(digits_model, calib)
    fc1 = report.layers["fc1"]
    assert len(fc1.sqnr) == 28  # 6 methods x 2 schemes x 2 granularities + 4 smoothed
    # the outlier channel: per-tensor max calibration is far worse than SmoothQuant on fc1's input
    assert fc1.sqnr["max/affine/per_channel/smooth0.5"] > fc1.sqnr["max/affine/per_channel"] + 10
    # conv2's weights carry the outlier channel: per-channel weights beat per-tensor
    conv2 = report.layers["conv2"]
    assert conv2.sqnr["max/affine/per_channel"] > conv2.sqnr["max/affine/per_tensor"] + 10
    plan = report.best_plan().fallback(["conv2"])
    cov = report.coverage(plan)
    total = sum(i.macs for i in calib.layers.values())
    assert cov["macs"] == pytest.approx(1 - calib.layers["conv2"].macs / total)
    assert cov["int8_bytes"] < cov["fp32_bytes"]
    full = report.coverage(report.best_plan())
    assert full["macs"] == 1.0 and full["int8_bytes"] < 0.3 * full["fp32_bytes"]
