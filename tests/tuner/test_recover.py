"""Keeping layers INT8 before falling back (issue 16): SmoothQuant strength per layer, chosen by
measured error; its factors folded into the producing LayerNorm/Linear (no Div in the deployed
graph, every INT8 layer on an INT8 kernel); bias correction of the measured output shift."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from torch import nn

from tuner import LayerConfig, Plan, apply_plan, calibrate, export_onnx, layer_report, load_onnx
from tuner.onnx_kernels import check_kernels, optimized_graph
from tuner.report import SMOOTH_ALPHAS, STRONGEST_SMOOTHING_WINDOW_DB, LayerReport


class PreNorm(nn.Module):
    """LayerNorm -> up -> ReLU -> down, plus a head on the raw input: `up`'s factors fold into the
    LayerNorm, `down`'s into `up`; `head` reads the model input (nothing to fold into)."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up, self.down, self.head = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x)))) + self.head(x)


def outlier_model(seed=0):
    """A PreNorm whose LayerNorm and `up` outputs carry a few outlier channels, as GELU/LayerNorm
    outputs do in transformers."""
    torch.manual_seed(seed)
    model = PreNorm().eval()
    with torch.no_grad():
        model.norm.weight[:2] = 40.0  # two outlier channels into `up`
        model.norm.bias.add_(0.5)
        model.up.weight[:3] *= 30.0  # three outlier channels into `down`
        model.up.bias[:3] = 5.0
    return model


def batches(seed, n=4, rows=64, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g) for _ in range(n)]


def output_sqnr(reference: nn.Module, model: nn.Module, data) -> float:
    with torch.no_grad():
        ref = torch.cat([reference(x) for x in data]).double()
        out = torch.cat([model(x) for x in data]).double()
    return 10 * math.log10(float((ref * ref).sum()) / float(((ref - out) ** 2).sum()))


def outlier_batches(seed, channel_gain, token_gain):
    """Inputs with two outlier channels (smoothing moves them into the weights) and every 16th token
    large (which no per-channel factor can help): how strong the best smoothing is depends on both."""
    g = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(4):
        x = torch.randn(64, 32, generator=g)
        x[:, :2] *= channel_gain
        x[::16] *= token_gain
        found.append(x)
    return found


@pytest.mark.parametrize(("width", "channel_gain", "expected"), [(32, 10, 0.95), (128, 100, 0.9)])
def test_a_smoothed_linear_takes_the_strongest_strength_its_measured_error_allows(width, channel_gain, expected):
    """The strongest strength within STRONGEST_SMOOTHING_WINDOW_DB of the best measured one, with no
    bias correction: not one fixed strength (a wide layer with strong outliers loses too much
    weight precision at 0.95)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(64, width, generator=g) * torch.tensor([channel_gain] * 2 + [1] * (width - 2)) for _ in range(4)]
    calib = calibrate(model, data)
    report = layer_report(model, calib)
    errors, config = report.layers["0"], report.best_plan().config("0")
    smoothed = {a: errors.sqnr[f"max/affine/per_channel/smooth{a:g}"] for a in SMOOTH_ALPHAS}
    strongest = max(a for a, v in smoothed.items() if v >= max(smoothed.values()) - STRONGEST_SMOOTHING_WINDOW_DB)
    assert config.smooth == strongest == expected and not config.bias_correction
    assert max(smoothed, key=smoothed.__getitem__) < 0.95  # SQNR alone would pick a weaker one
    plain = max(v for k, v in errors.sqnr.items() if "smooth" not in k)
    assert errors.recovery(config)["smoothquant"] == {"alpha": config.smooth,
                                                      "gain_db": pytest.approx(smoothed[config.smooth] - plain, abs=1e-3)}


def test_smoothing_folds_into_the_layernorm_and_linear_with_the_same_numbers():
    model = outlier_model()
    calib = calibrate(model, batches(1))
    assert calib.smooth_folds == {"up": "norm", "down": "up"}  # `head` reads the input: nothing to fold into
    plan = Plan({"up": LayerConfig(smooth=0.75), "down": LayerConfig(smooth=0.85), "head": LayerConfig(smooth=0.5)})
    folded = apply_plan(model, plan, calib)
    assert folded.up.input_divisor is None and folded.up.folded_into == "norm"
    assert folded.down.input_divisor is None and folded.down.folded_into == "up"
    assert folded.head.input_divisor is not None  # the Div stays where nothing can take the factors
    folds, calib.smooth_folds = calib.smooth_folds, {}
    with_div = apply_plan(model, plan, calib)
    calib.smooth_folds = folds
    for x in batches(2):
        a, b = folded(x).detach(), with_div(x).detach()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert torch.equal(model.norm.weight[:2], torch.full((2,), 40.0))  # the caller's model is untouched


def test_folded_smoothing_leaves_no_div_and_every_layer_on_an_int8_kernel(tmp_path):
    model = outlier_model()
    calib = calibrate(model, batches(1))
    plan = Plan({"up": LayerConfig(smooth=0.75), "down": LayerConfig(smooth=0.85), "head": LayerConfig()})
    path = export_onnx(model, plan, calib, tmp_path / "folded.onnx")
    assert "Div" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    ops = {n.op_type for n in optimized_graph(path, tmp_path).graph.node}
    assert "Div" not in ops
    check = check_kernels(path, {n: i.macs for n, i in calib.layers.items()})
    assert sorted(check.planned_int8) == sorted(check.running_int8) == ["down", "head", "up"]


class ConvChain(nn.Module):
    """conv1 -> BatchNorm -> ReLU (or ReLU6) -> conv2 -> ReLU -> pooling -> head; the BatchNorm
    gives two of conv1's output channels (conv2's input channels) a 30x larger range, and conv2's
    weights read them 30x weaker: every channel counts as much, as smoothing assumes."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act()
        self.conv2, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(self.act(self.bn1(self.conv1(x))))).mean((2, 3)))


def conv_chain(act=nn.ReLU):
    torch.manual_seed(0)
    model = ConvChain(act).eval()
    with torch.no_grad():
        model.bn1.weight[:2] = 30.0
        model.bn1.bias.fill_(0.2)
        model.conv2.weight[:, :2] /= 30.0
    return model


def image_batches(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def test_smoothing_folds_into_the_conv_before_a_relu_cross_layer_equalization(tmp_path):
    """conv2's factors fold into conv1 (its BatchNorm folded first): conv2's input quantizer is then
    conv1's output quantizer, the deployed graph has no Div and both convs run INT8 kernels. With
    per-tensor weights on conv1 the fold is not made, and the Div costs neither conv its kernel."""
    model = conv_chain()
    calib = calibrate(model, image_batches(1))
    assert calib.graph.folds == {"conv1": "bn1"} and calib.smooth_folds == {"conv2": "conv1"}
    report = layer_report(model, calib)
    errors, config = report.layers["conv2"], report.best_plan().config("conv2")
    plain = max(v for k, v in errors.sqnr.items() if "smooth" not in k)
    assert config.smooth and errors.sqnr_of(config) > plain + 3  # equalized: chosen, at no cost (folded)
    assert errors.smooth_cost_db == 0.0
    plan = report.best_plan()
    folded = apply_plan(model, plan, calib)
    assert folded.conv2.input_divisor is None and folded.conv2.folded_into == "conv1"
    unsmoothed = errors.best([c for c in errors.settings.values() if not c.smooth])
    alone = {c: output_sqnr(model, apply_plan(model, Plan({"conv2": c}), calib), image_batches(3)) for c in (config, unsmoothed)}
    assert alone[config] > alone[unsmoothed] + 6  # measured 56.9 dB against 46.5 (held-out data)
    path = export_onnx(model, plan, calib, tmp_path / "cle.onnx")
    assert "Div" not in {n.op_type for n in optimized_graph(path, tmp_path).graph.node}
    x = torch.cat(image_batches(2))
    simulated, deployed = folded(x).detach(), load_onnx(path, threads=1)(x)
    assert (deployed - simulated).abs().max() <= 1e-4 * simulated.abs().max()  # the fold is what ORT runs
    check = check_kernels(path, {n: i.macs for n, i in calib.layers.items()})
    assert sorted(check.planned_int8) == sorted(check.running_int8) == ["conv1", "conv2", "head"]

    per_tensor = Plan({**plan.layers, "conv1": LayerConfig(weights="per_tensor")})
    assert "conv2" not in calib.div_free(per_tensor)
    assert apply_plan(model, per_tensor, calib).conv2.input_divisor is not None
    path = export_onnx(model, per_tensor, calib, tmp_path / "div.onnx")
    check = check_kernels(path, {n: i.macs for n, i in calib.layers.items()})
    assert sorted(check.running_int8) == ["conv1", "conv2", "head"]


def test_no_fold_through_relu6_it_does_not_scale():
    calib = calibrate(conv_chain(nn.ReLU6), image_batches(1))
    assert calib.graph.folds == {"conv1": "bn1"} and calib.smooth_folds == {}


def test_bias_correction_reduces_the_measured_error_and_is_chosen_for_it():
    """Inputs with a large mean (as after a ReLU) and weight rows summing to about zero: the weights'
    rounding errors do not sum to zero, so they shift every output by a constant per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight -= model[0].weight.mean(1, keepdim=True)
    calib = calibrate(model, [5 + 0.5 * x for x in batches(1)])
    report = layer_report(model, calib)
    errors = report.layers["0"]
    plain, corrected = errors.sqnr["max/affine/per_channel"], errors.sqnr["max/affine/per_channel/bc"]
    assert corrected > plain + 5
    plan = report.best_plan()
    assert plan.config("0").bias_correction
    gain = errors.recovery(plan.config("0"))["bias_correction"]["gain_db"]
    assert gain == pytest.approx(errors.sqnr_of(plan.config("0")) - errors.sqnr[errors.label(
        LayerConfig(**{**plan.config("0").to_dict(), "bias_correction": False}))], abs=1e-3)
    without = plan.replace({"0": LayerConfig(**{**plan.config("0").to_dict(), "bias_correction": False})})
    held_out = [5 + 0.5 * x for x in batches(7)]  # data the shift was not measured on
    assert output_sqnr(model, apply_plan(model, plan, calib), held_out) > \
        output_sqnr(model, apply_plan(model, without, calib), held_out) + 5


def test_a_plan_with_bias_correction_applies_without_a_report():
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    calib = calibrate(model, batches(1))
    plan = Plan({"0": LayerConfig(weights="per_tensor", bias_correction=True)})
    assert Plan.from_json(plan.to_json()) == plan
    apply_plan(model, plan, calib)  # the shift is measured on demand
    assert calib.bias_shift("0", plan.config("0")).shape == (8,)


def test_report_keeps_bias_shifts_for_other_workers():
    from tuner.prepared import dump_prepared, load_prepared

    model, data = outlier_model(), batches(1)
    calib = calibrate(model, data)
    report = layer_report(model, calib)
    loaded, loaded_report = load_prepared(dump_prepared(calib, report), model, data)
    assert isinstance(loaded_report, LayerReport)
    assert loaded.smooth_folds == calib.smooth_folds
    config = LayerConfig(bias_correction=True)
    assert torch.equal(loaded.bias_shift("up", config), calib.bias_shift("up", config))
