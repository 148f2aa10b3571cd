"""Calibration, plans and simulated INT8 on real models."""

import json

import pytest
import torch

from tuner import (
    FP32, CalibrationError, InvalidPlanError, LayerConfig, Plan, QuantizedLayer, apply_plan, calibrate, layer_report,
)
from tuner.examples import digits
from tuner.quant import quantize
from tuner.sensitivity import rank_layers
from tuner.space import SearchSpace, plan_for


def test_calibration_is_one_forward_pass_per_batch(digits_model, digits_batches):
    from torch._subclasses.fake_tensor import FakeTensor

    from tuner.smoothing import VERIFY_SAMPLES

    calls = []  # passes over real data (reading the graph traces the model once on fake tensors;
    # checking where SmoothQuant factors fold runs a few samples, `smoothing.VERIFY_SAMPLES`)
    handle = digits_model.register_forward_pre_hook(
        lambda m, a: None if isinstance(a[0], FakeTensor) or len(a[0]) <= VERIFY_SAMPLES else calls.append(1))
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
    assert "head" in calib.layers and "layer.down" in calib.layers and "embed" in calib.layers
    assert len(calib.layers) == 7  # the embedding, 5 block Linears, the head
    plan = calib.uniform_plan(LayerConfig(activation="mse"))
    quantized = apply_plan(tiny_encoder, plan, calib)
    out, hidden = quantized(**encoder_batches[0])
    ref_out, ref_hidden = tiny_encoder(**encoder_batches[0])
    assert out.shape == ref_out.shape and hidden.shape == ref_hidden.shape
    assert torch.allclose(out, ref_out, atol=0.1) and not torch.equal(out, ref_out)


def test_layer_report_measures_every_setting_and_coverage(digits_model, digits_batches):
    calib = calibrate(digits_model, digits_batches)
    report = layer_report(digits_model, calib)
    fc2 = report.layers["fc2"]
    assert len(fc2.sqnr) == 96  # (6 methods x 2 schemes x 2 granularities + 6 strengths x 4 smoothed) x bias correction
    # the outlier channel: per-tensor max calibration is far worse than SmoothQuant on fc2's input
    assert fc2.sqnr["max/affine/per_channel/smooth0.5"] > fc2.sqnr["max/affine/per_channel"] + 10
    assert report.best_plan().config("fc2").smooth  # and the report picks it there
    # fc1's weights carry the outlier row: per-channel weights beat per-tensor
    fc1 = report.layers["fc1"]
    assert fc1.sqnr["max/affine/per_channel"] > fc1.sqnr["max/affine/per_tensor"] + 10
    # a layer already at negligible error keeps the simplest setting: no smoothing on conv2
    assert not report.best_plan().config("conv2").smooth
    plan = report.best_plan().fallback(["conv2"])
    cov = report.coverage(plan)
    total = sum(i.macs for i in calib.layers.values())
    assert cov["macs"] == pytest.approx(1 - calib.layers["conv2"].macs / total)
    assert cov["int8_bytes"] < cov["fp32_bytes"]
    full = report.coverage(report.best_plan())
    assert full["macs"] == 1.0 and full["int8_bytes"] < 0.3 * full["fp32_bytes"]


# -- embeddings: weight-only INT8 layers ---------------------------------------------------------


def test_embedding_is_calibrated_as_a_weight_only_layer(tiny_encoder, encoder_batches):
    calib = calibrate(tiny_encoder, encoder_batches)
    assert list(calib.layers)[0] == "embed"
    embed = calib.layers["embed"]
    assert embed.kind == "Embedding" and embed.weight_only
    assert embed.calls == len(encoder_batches) and embed.macs == 0 and embed.params == 50 * 32
    assert embed.input.count == 0  # integer input: no activation statistics
    assert all(info.macs > 0 and not info.weight_only for name, info in calib.layers.items() if name != "embed")
    with pytest.raises(InvalidPlanError, match="weight-only"):
        calib.activation_qparams("embed", "max", False)
    # its table counts in the parameters and bytes made INT8, not in the MACs
    only_embed = Plan({"embed": LayerConfig()})
    cov = calib.coverage(only_embed)
    assert cov["macs"] == 0.0 and cov["params"] == pytest.approx(1600 / calib.model_params)
    assert cov["int8_bytes"] == cov["fp32_bytes"] - 3 * 1600 + 4 * 50  # 1 byte per entry + a scale per row


def test_apply_plan_quantizes_an_embedding_table_per_row(tiny_encoder, encoder_batches):
    before = tiny_encoder.embed.weight.detach().clone()
    ids = encoder_batches[0]["input_ids"]
    calib = calibrate(tiny_encoder, encoder_batches)
    quantized = apply_plan(tiny_encoder, calib.uniform_plan(), calib)
    q = quantized.embed
    assert isinstance(q, QuantizedLayer) and q.weight_only and q.act_qparams is None
    assert q.weight_qparams.symmetric and q.weight_qparams.axis == 0 and q.weight_qparams.scale.shape == (50,)
    # one scale per row: max|row| / 127, every entry a multiple of its row's scale in [-127, 127]
    torch.testing.assert_close(q.weight_qparams.scale, before.abs().amax(1) / 127)
    codes = quantize(before, q.weight_qparams)
    assert codes.abs().max() == 127 and torch.equal(q.weight, codes * q.weight_qparams.scale[:, None])
    assert torch.equal(q(ids), q.weight[ids])  # the output rows are the quantized table's rows
    assert not torch.equal(q(ids), tiny_encoder.embed(ids)) and torch.allclose(q(ids), tiny_encoder.embed(ids), atol=0.02)
    # the caller's model is untouched
    assert type(tiny_encoder.embed) is torch.nn.Embedding and torch.equal(tiny_encoder.embed.weight, before)

    per_tensor = apply_plan(tiny_encoder, Plan({"embed": LayerConfig(weights="per_tensor")}), calib).embed
    assert per_tensor.weight_qparams.scale.dim() == 0
    assert per_tensor.weight_qparams.scale == pytest.approx(before.abs().max().item() / 127)
    with pytest.raises(InvalidPlanError, match="'embed'.*weight-only.*smooth"):
        apply_plan(tiny_encoder, Plan({"embed": LayerConfig(smooth=0.5)}), calib)


def test_report_measures_an_embedding_under_weight_settings_only(tiny_encoder, encoder_batches):
    calib = calibrate(tiny_encoder, encoder_batches)
    report = layer_report(tiny_encoder, calib)
    embed = report.layers["embed"]
    assert embed.weight_only and embed.macs == 0
    assert set(embed.sqnr) == {"weight-only/per_channel", "weight-only/per_tensor"}
    assert embed.sqnr["weight-only/per_channel"] > embed.sqnr["weight-only/per_tensor"] > 30
    assert len(report.layers["head"].sqnr) == 96  # every setting, each also with bias correction
    # a restricted allowed list still picks a measured setting: only `weights` matters here
    mse_sym_tensor = LayerConfig("int8", "mse", "symmetric", "per_tensor")
    assert embed.best([mse_sym_tensor]).weights == "per_tensor"
    assert embed.best([LayerConfig(smooth=0.5)]).weights == "per_channel"
    assert embed.best() == LayerConfig(weights="per_channel")
    # the search space's plans and the sensitivity ranking include it
    space = SearchSpace()
    plan = plan_for(space.point(0, activation="mse", weights="per_tensor", smooth=False), space, report, [])
    assert plan.layers["embed"] == LayerConfig(weights="per_tensor") and plan.layers["head"].activation == "mse"
    ranking = rank_layers(tiny_encoder, calib, report.best_plan())
    assert sorted(ranking) == sorted(calib.layers)
    assert report.table()[0]["best_setting"] == "weight-only/per_channel"
    # a report restricted to one weight granularity measures just that one for the embedding
    only = layer_report(tiny_encoder, calib, [LayerConfig(activation="mse", weights="per_tensor")])
    assert list(only.layers["embed"].sqnr) == ["weight-only/per_tensor"]


def test_plan_summary_names_every_setting_with_its_layer_count() -> None:
    def int8(activation: str, scheme: str, weights: str) -> LayerConfig:
        return LayerConfig(activation=activation, scheme=scheme, weights=weights)

    one = Plan({"a": int8("max", "affine", "per_channel"), "b": LayerConfig(precision="fp32")})
    assert one.summary() == "1/2 int8 (max/affine/per_channel)"
    mixed = Plan({"a": int8("max", "affine", "per_channel"), "b": int8("entropy", "symmetric", "per_channel"),
                  "c": int8("entropy", "symmetric", "per_channel"), "d": int8("mse", "affine", "per_tensor")})
    assert mixed.summary() == "4/4 int8: 2 entropy/symmetric/per_channel, 1 max/affine/per_channel, 1 mse/affine/per_tensor"
    many = Plan({**mixed.layers, "e": int8("max", "affine", "per_tensor"), "f": int8("mse", "symmetric", "per_tensor"),
                 "g": int8("mse", "symmetric", "per_tensor")})
    assert many.summary() == ("7/7 int8: 2 entropy/symmetric/per_channel, 2 mse/symmetric/per_tensor, "
                              "1 max/affine/per_channel, +2 more settings on 2 layers")
    assert Plan({"a": LayerConfig(precision="fp32")}).summary() == "0/1 int8"


def test_output_sqnr_orders_whole_plans_by_the_models_output_error(digits_model, digits_batches):
    from tuner.sensitivity import output_sqnr

    calib = calibrate(digits_model, digits_batches)
    report = layer_report(digits_model, calib, SearchSpace().settings())
    naive = calib.uniform_plan(LayerConfig(activation="max", scheme="affine", weights="per_tensor"))
    measured = report.best_plan()
    assert output_sqnr(digits_model, calib, Plan.uniform(calib.layers, FP32)) == float("inf")  # nothing INT8
    # the planted outlier channel crushes naive per-tensor INT8 (10% accuracy); the measured plan keeps it
    assert output_sqnr(digits_model, calib, naive) < 10 < 20 < output_sqnr(digits_model, calib, measured)
