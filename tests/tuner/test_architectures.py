"""The architectures users have: tiny models in the style of ResNet, MobileNetV2/V3, EfficientNet,
DenseNet and ShuffleNetV2 (faithful copies of torchvision's classes, trained on the digits in
seconds) go through calibration, the per-layer report, `tune` with the default space and ONNX
Runtime, and what ONNX Runtime runs is what the plan says.

Each model is small (a few blocks of each kind, 8-64 channels, 16x16 images) and is trained once
per module; everything runs on one thread (the test machine's 2 cores are shared, and with two
threads a busy machine made training 10x slower).
"""

from __future__ import annotations

import math
from functools import partial

import onnx
import pytest
import torch
from torch import nn

from tuner import apply_plan, calibrate, layer_report, load_onnx, quantizable_layers, tune
from tuner.examples.vision import digits_data, train_on_digits
from tuner.examples.vision.densenet import densenet
from tuner.examples.vision.efficientnet import EfficientNet, MBConvConfig
from tuner.examples.vision.mobilenetv2 import mobilenet_v2
from tuner.examples.vision.mobilenetv3 import InvertedResidualConfig, MobileNetV3
from tuner.examples.vision.resnet import resnet18
from tuner.examples.vision.shufflenetv2 import shufflenet_v2
from tuner import onnx_kernels

IMAGE_SIZE = 16
INT8_KERNELS = {"QLinearConv", "QGemm", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "ConvInteger"}


def _mobilenet_v3() -> nn.Module:
    conf = partial(InvertedResidualConfig, width_mult=0.5)
    setting = [  # the first blocks of MobileNetV3-Small, plus a Hardswish block with SE and a residual add
        conf(16, 3, 16, 16, True, "RE", 2, 1),
        conf(16, 3, 72, 24, False, "RE", 2, 1),
        conf(24, 5, 96, 24, True, "HS", 1, 1),
    ]
    return MobileNetV3(setting, last_channel=64, num_classes=10, in_channels=1)


def _efficientnet() -> nn.Module:
    conf = partial(MBConvConfig, width_mult=0.5, depth_mult=1.0)
    setting = [conf(1, 3, 1, 32, 16, 1), conf(6, 3, 2, 16, 24, 2)]  # the second stage has a residual MBConv
    return EfficientNet(setting, dropout=0.2, num_classes=10, in_channels=1)


ARCHITECTURES = {
    "resnet": lambda: resnet18(num_classes=10, in_channels=1, width=8),
    "mobilenet_v2": lambda: mobilenet_v2(num_classes=10, in_channels=1, width_mult=0.25,
                                         inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]),
    "mobilenet_v3": _mobilenet_v3,
    "efficientnet": _efficientnet,
    "densenet": lambda: densenet(num_classes=10, in_channels=1, growth_rate=8, block_config=(2, 2),
                                 num_init_features=16, bn_size=2),
    "shufflenet_v2": lambda: shufflenet_v2(num_classes=10, in_channels=1, stages_repeats=(2, 1, 1),
                                           stages_out_channels=(8, 16, 32, 64, 64)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return digits_data(IMAGE_SIZE)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def trained(request):
    """(name, trained model) for each architecture."""
    torch.manual_seed(0)
    model = train_on_digits(ARCHITECTURES[request.param](), epochs=4, image_size=IMAGE_SIZE, batch_size=128, lr=1e-2)
    return request.param, model


@pytest.fixture(scope="module")
def tuned(trained, data):
    """`tune` with the default space and a 1% budget, ONNX Runtime check on (what a user runs), without
    the latency figures (timing is the benchmarks' job; it would also export an FP32 file per model)."""
    name, model = trained
    batches, evaluate = data
    return tune(model, batches, evaluate, max_drop=0.01, verbose=False, latency_runs=0)


def conv_and_linear(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# -- calibration and the per-layer report --------------------------------------------------------


def test_calibrate_and_report_cover_every_layer_and_leave_the_model_alone(trained, data):
    name, model = trained
    batches, _ = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]

    calibration = calibrate(model, batches)
    report = layer_report(model, calibration, max_batches=1)  # every setting, on one batch: tune measures all

    layers = conv_and_linear(model)
    assert set(quantizable_layers(model)) == layers
    assert set(calibration.layers) == layers
    assert set(report.layers) == layers
    for layer, errors in report.layers.items():
        assert errors.sqnr, f"{name}: {layer} has no INT8 setting"
        assert all(not math.isnan(s) for s in errors.sqnr.values()), f"{name}: {layer}: {errors.sqnr}"
        assert max(errors.sqnr.values()) > 10, f"{name}: {layer}: best SQNR {max(errors.sqnr.values()):.1f} dB"
    assert set(report.best_plan().int8_layers) == layers
    # the caller's model is untouched: same modules (BatchNorm not folded away), same weights and statistics
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_smoothing_an_input_that_arrives_quantized_pays_for_requantizing_it(data):
    """An expand conv reading a residual Add's INT8 output would dequantize it, divide and quantize
    it again if smoothed: it must gain as much as a Div after a conv output (SMOOTH_COST_DB), not
    the 1 dB of a Div on a float input. (Untrained weights: only the graph matters here.)"""
    from tuner.report import SMOOTH_COST_DB, smooth_costs

    batches, _ = data
    calibration = calibrate(ARCHITECTURES["mobilenet_v2"]().eval(), batches[:1])
    quantized = calibration.output_sites(calibration.uniform_plan())
    readers = {layer for site in quantized for layer in calibration.graph.direct_inputs.get(site, ())}
    joins = {join.output for join in calibration.graph.joins}
    assert readers & {layer for site in joins for layer in calibration.graph.direct_inputs.get(site, ())}
    costs = smooth_costs(calibration)
    assert all(costs[layer] == SMOOTH_COST_DB for layer in readers)


# -- tune, end to end ----------------------------------------------------------------------------


def test_tune_meets_the_budget_and_its_plan_covers_every_layer(trained, tuned):
    name, model = trained
    result = tuned
    assert result.baseline > 80, f"{name}: the trained model scores only {result.baseline:.1f}%"
    assert result.met, f"{name}: {result.reason}"
    assert result.drop <= 0.01
    layers = conv_and_linear(model)
    assert set(result.int8_layers) | set(result.fp32_layers) == layers
    assert set(result.ledger) >= layers
    assert result.coverage["macs"] > 0.5, f"{name}: only {result.coverage['macs']:.0%} of the MACs INT8"


def test_deployed_score_matches_the_simulated_one(trained, tuned, data):
    """The ONNX Runtime check tune ran: within three test images (0.56 points) of the simulated
    score, and the deployed model itself meets the budget. ONNX Runtime's INT8 kernels requantize
    each layer's output with float rounding of their own, which flips 0-2 borderline images of 540
    on these tiny 16x16 models (seen: ShuffleNetV2 2, MobileNetV2 and DenseNet 1-2); the 0.2% target
    is checked on the full-size benchmark cases (benchmarks/bench_onnx.py)."""
    name, _ = trained
    result = tuned
    three_images = 3 * 100.0 / 540
    assert result.deployed_score is not None, f"{name}: no deployed score ({result.warnings})"
    assert abs(result.deployed_score - result.score) <= three_images + 1e-9, (
        f"{name}: simulated {result.score:.2f}% vs deployed {result.deployed_score:.2f}%")
    assert result.deployed_drop <= 0.01 + 1e-9


def test_deployed_outputs_match_the_simulation(trained, tuned, data, tmp_path):
    """Logits of the exported file on ONNX Runtime vs the simulated INT8 model, on held-out images."""
    name, _ = trained
    batches, _ = data
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(tuned.onnx)
    x = torch.cat(batches)
    with torch.no_grad():
        simulated = tuned.model(x)
        deployed = load_onnx(path, threads=1)(x)
    assert deployed.shape == simulated.shape
    scale = simulated.abs().max()
    error = (deployed - simulated).abs().max()
    assert error <= 0.05 * scale, f"{name}: max |deployed - simulated| {error:.4f} vs max |logit| {scale:.4f}"
    agree = (deployed.argmax(1) == simulated.argmax(1)).float().mean()
    assert agree >= 0.98, f"{name}: deployed and simulated top-1 agree on {agree:.1%} of the images"


# -- what ONNX Runtime really runs ---------------------------------------------------------------


def optimized_graph(onnx_bytes: bytes, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime executes on CPU after all its optimizations (QDQ fusions included)."""
    source = tmp_path / "model.onnx"
    source.write_bytes(onnx_bytes)
    return onnx_kernels.optimized_graph(source, tmp_path)


def test_every_int8_layer_runs_an_int8_kernel(trained, tuned, tmp_path):
    """Each layer the tuned plan keeps INT8 has its int8 weight `<layer>.weight` consumed by an INT8
    kernel (QLinearConv, QGemm, MatMulInteger, ...) in ONNX Runtime's optimized graph: otherwise it
    runs as a float op on weights dequantized at every call, slower than FP32."""
    name, _ = trained
    graph = optimized_graph(tuned.onnx, tmp_path).graph
    int8_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node.op_type)
    float_layers = {}
    for layer in tuned.int8_layers:
        weight = f"{layer}.weight"
        assert weight in int8_weights, f"{name}: {weight} is not an int8 initializer of the optimized graph"
        ops = consumers.get(weight, [])
        if not INT8_KERNELS & set(ops):
            float_layers[layer] = ops
    ops = sorted({n.op_type for n in graph.node})
    assert not float_layers, (
        f"{name}: {len(float_layers)} of {len(tuned.int8_layers)} INT8 layers do not run an INT8 kernel "
        f"(their weight goes to {sorted({op for v in float_layers.values() for op in v})}): "
        f"{sorted(float_layers)[:8]}...; optimized graph ops: {ops}")



def test_silu_and_squeeze_excitation_run_on_uint8_data(data, tmp_path):
    """EfficientNet's SiLUs (x * sigmoid(x)) and squeeze-excitation products (sigmoid(scale) * x)
    run as QLinearSigmoid + QLinearMul once their inputs, outputs and the SiLU's sigmoid are
    quantized; only the last SiLU, read by the float pooling before the classifier, stays float.
    The simulation computes what ONNX Runtime computes. (Untrained weights: the graph is the point.)"""
    from collections import Counter

    from tuner import export_onnx

    batches, _ = data
    model = ARCHITECTURES["efficientnet"]().eval()
    calibration = calibrate(model, batches[:2])
    plan = calibration.uniform_plan()
    sites = calibration.output_sites(plan)
    silus = calibration.quantized_silus(plan, sites)
    assert sorted(set(calibration.graph.silus) - set(silus)) == ["features.3.2"]  # the last conv's SiLU
    products = [join for join in calibration.graph.joins if join.op == "mul"]
    assert len(products) == 3 and all(site in sites for join in products for site in [*join.inputs, join.output])
    path = tmp_path / "efficientnet.onnx"
    export_onnx(model, plan, calibration, path)
    ops = Counter(node.op_type for node in onnx_kernels.optimized_graph(path, tmp_path).graph.node)
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == len(silus) + len(products), ops
    assert ops["Sigmoid"] == ops["Mul"] == 1, ops
    x = torch.cat(batches[:2])
    with torch.no_grad():
        simulated = apply_plan(model, plan, calibration)(x)
    deployed = load_onnx(path, threads=1)(x)
    assert (deployed - simulated).abs().max() <= 1e-4 * simulated.abs().max()
