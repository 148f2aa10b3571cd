"""What the INT8 runtime runs: BatchNorm folded, quantizers placed where ONNX Runtime needs them,
checked on ONNX Runtime's own optimized graph."""

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

from tuner import FP32, InvalidPlanError, LayerConfig, Plan, apply_plan, calibrate, export_onnx, layer_report, load_onnx
from tuner.onnx_kernels import optimized_graph


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one ReLU module called twice, an in-place residual add."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, 10)

    def forward(self, x):
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvGap(nn.Module):
    """Convolutions ending in ReLU -> global average pooling: the last conv's output feeds a pool."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 16, 3)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = _randomize_batchnorms(TinyResNet())
    batches = [torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calib = calibrate(model, batches)
    return model, batches, calib, layer_report(model, calib).best_plan()


def optimized_ops(path, tmp_path) -> Counter:
    return Counter(n.op_type for n in optimized_graph(path, tmp_path).graph.node)


def test_batchnorm_is_folded_and_the_callers_model_untouched(resnet, tmp_path):
    model, batches, calib, plan = resnet
    assert calib.graph.folds == {"conv1": "bn1", "layer1.0.conv1": "layer1.0.bn1", "layer1.0.conv2": "layer1.0.bn2",
                                 "layer1.1.conv1": "layer1.1.bn1", "layer1.1.conv2": "layer1.1.bn2"}
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None  # the caller's model as it was
    with torch.no_grad():
        torch.testing.assert_close(calib.model(batches[0]), model(batches[0]), rtol=1e-4, atol=1e-5)
    fp32 = export_onnx(model, Plan.uniform(calib.layers, FP32), calib, tmp_path / "fp32.onnx")
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(fp32).graph.node}


def test_every_int8_conv_and_residual_add_runs_an_int8_kernel(resnet, tmp_path):
    model, batches, calib, plan = resnet
    assert calib.runs_float(plan) == {} and calib.coverage(plan)["macs"] == 1.0
    path = export_onnx(model, plan, calib, tmp_path / "int8.onnx")
    ops = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 5 and ops["Conv"] == 0
    assert ops["QLinearAdd"] == 2 and ops["BatchNormalization"] == 0

    # one tensor, one scale: with the pooled tensor's reader calibrated by a percentile (not the
    # stem's 'max'), the max-pooling still moves int8 data and nothing is requantized between INT8
    # kernels (one QuantizeLinear for the input, one DQ/Q pair around the global pooling)
    clipped = plan.replace({"layer1.0.conv1": LayerConfig(activation="percentile-99.9", weights="per_channel")})
    ops = optimized_ops(export_onnx(model, clipped, calib, tmp_path / "clipped.onnx"), tmp_path)
    assert ops["QLinearConv"] == 5 and ops["MaxPool"] == 0
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 1
    simulated = apply_plan(model, plan, calib)
    with torch.no_grad():
        x = torch.cat(batches)
        sim, deployed = simulated(x), load_onnx(path, threads=1)(x)
    assert (sim - deployed).abs().max() <= 0.02 * sim.abs().max()


def test_the_plan_shows_and_overrides_the_placed_quantizers(resnet, tmp_path):
    model, _, calib, plan = resnet
    sites = calib.output_sites(plan)
    assert sites["layer1.0.bn2"].startswith("output of INT8 conv layer1.0.conv2")  # it feeds the residual add
    assert "layer1.0" in sites and "layer1.1" in sites  # the adds' outputs (after the block's ReLU)
    no_output = Plan(plan.layers, tensors={"layer1.0.bn2": "fp32"})
    assert Plan.from_json(no_output.to_json()) == no_output
    assert "layer1.0.bn2" not in calib.output_sites(no_output)
    assert "layer1.0.conv2" in calib.runs_float(no_output)
    assert calib.coverage(no_output)["macs"] < calib.coverage(plan)["macs"] == 1.0
    ops = optimized_ops(export_onnx(model, no_output, calib, tmp_path / "override.onnx"), tmp_path)
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 1  # the runtime agrees: that conv runs in float
    with pytest.raises(InvalidPlanError, match="layer1.9"):
        apply_plan(model, Plan(plan.layers, tensors={"layer1.9": "int8"}), calib)
    with pytest.raises(InvalidPlanError, match="tensor"):
        Plan(plan.layers, tensors={"layer1.0": "int4"})


def test_a_conv_feeding_global_average_pooling_still_runs_int8(tmp_path):
    torch.manual_seed(0)
    model = ConvGap().eval()
    batches = [torch.rand(8, 1, 12, 12) for _ in range(2)]
    calib = calibrate(model, batches)
    plan = layer_report(model, calib).best_plan()
    assert calib.graph.conv_outputs["conv3"].others == ["mean"]
    assert calib.output_sites(plan) == {"conv3": "output of INT8 conv conv3 (read by mean)"}
    ops = optimized_ops(export_onnx(model, plan, calib, tmp_path / "gap.onnx"), tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0


def test_depthwise_convs_are_not_offered_smoothing():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 8, 1)).eval()
    calib = calibrate(model, [torch.rand(4, 4, 8, 8)])
    report = layer_report(model, calib)
    assert not any(c.smooth for c in report.layers["0"].settings.values())
    assert any(c.smooth for c in report.layers["2"].settings.values())


def test_tune_ledger_says_what_the_runtime_runs(resnet):
    from tuner import tune

    model, batches, _, _ = resnet
    x = torch.cat(batches)
    with torch.no_grad():
        reference = model(x).argmax(1)

    def agreement(m):  # % of FP32's predictions kept
        with torch.no_grad():
            return 100.0 * float((m(x).argmax(1) == reference).float().mean())

    result = tune(model, batches, agreement, max_drop=0.5, verbose=False, verify=False)
    ledger = result.ledger
    assert ledger["layer1.0.conv2"]["batchnorm_folded"] == "layer1.0.bn2"
    assert ledger["layer1.0.conv2"]["output_quantized"]["site"] == "layer1.0.bn2"
    assert ledger["layer1.0.conv1"]["output_quantized"] is None  # it feeds an INT8 conv: nothing to add
    assert all(entry["runs_float"] is None for entry in ledger.values())
    assert result.coverage["macs"] == result.coverage["planned_macs"] == 1.0


def test_linear_batchnorm1d_is_folded_and_a_shared_batchnorm_is_not():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)
            self.a, self.b, self.shared = nn.Conv1d(8, 4, 1), nn.Conv1d(8, 4, 1), nn.BatchNorm1d(4)

        def forward(self, x):
            h = torch.relu(self.bn(self.fc(x))).unsqueeze(-1)
            return self.shared(self.a(h)) + self.shared(self.b(h))  # one BatchNorm after two convs

    model = _randomize_batchnorms(Model())
    for bn in (model.bn, model.shared):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 6)
    calib = calibrate(model, [x])
    assert calib.graph.folds == {"fc": "bn"}
    assert isinstance(calib.model.bn, nn.Identity) and isinstance(calib.model.shared, nn.BatchNorm1d)
    with torch.no_grad():
        torch.testing.assert_close(calib.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_model_loaded_from_a_torch_export_archive_is_folded_too(resnet, tmp_path):
    from tuner import export_model, load_exported

    model, batches, _, _ = resnet
    path = export_model(model, batches[0], tmp_path / "model.pt2")
    loaded = load_exported(path)  # its BatchNorms are calls on parameters held by plain Modules
    calib = calibrate(loaded, batches)
    assert calib.graph.folds == resnet[2].graph.folds  # folded in the graph: its batch_norm calls are gone
    plan = layer_report(loaded, calib).best_plan()
    with torch.no_grad():
        x = batches[0]
        assert (apply_plan(loaded, plan, calib)(x) - model(x)).abs().max() <= 0.1 * model(x).abs().max()
    assert not any("batch_norm" in str(n.target) for n in calib.model.graph.nodes)
    assert any("batch_norm" in str(n.target) for n in loaded.graph.nodes)  # the caller's module untouched
    ops = optimized_ops(export_onnx(loaded, plan, calib, tmp_path / "archive.onnx"), tmp_path)
    assert ops["QLinearConv"] == 5 and ops["Conv"] == 0 and ops["BatchNormalization"] == 0


# -- Concat and the data movement around it ----------------------------------------------------


def _tiny_shufflenet() -> nn.Module:
    from tuner.examples.vision.shufflenetv2 import shufflenet_v2

    return shufflenet_v2(num_classes=10, in_channels=1, stages_repeats=(2, 1, 1), stages_out_channels=(8, 16, 32, 64, 64))


def _tiny_densenet() -> nn.Module:
    from tuner.examples.vision.densenet import densenet

    return densenet(num_classes=10, in_channels=1, growth_rate=8, block_config=(3, 2), num_init_features=16, bn_size=2)


def _float_data_movement(graph: onnx.GraphProto) -> list[str]:
    """Concats and data-movement ops that read a DequantizeLinear's output: float data between INT8
    kernels (the shape arithmetic's Concats read Shape/Reshape, not DequantizeLinear)."""
    producer = {o: n.op_type for n in graph.node for o in n.output}
    return [n.op_type for n in graph.node if n.op_type in ("Concat", "Reshape", "Transpose", "Split", "Slice")
            and any(producer.get(i) == "DequantizeLinear" for i in n.input[:1] if n.op_type != "Concat")
            or n.op_type == "Concat" and any(producer.get(i) == "DequantizeLinear" for i in n.input)]


def _calibrated(build):
    torch.manual_seed(0)
    model = _randomize_batchnorms(build())
    batches = [torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calib = calibrate(model, batches)
    return model, batches, calib, layer_report(model, calib).best_plan()


@pytest.mark.parametrize("build, concats", [(_tiny_shufflenet, 4), (_tiny_densenet, 5)], ids=["shufflenet", "densenet"])
def test_concats_and_channel_shuffles_run_in_int8(build, concats, tmp_path):
    """torch.cat in a block's forward, the channel shuffle's view/transpose/view and the chunk that
    feeds the next Concat are quantized at functional sites (`<module>/cat`, ...): ONNX Runtime runs
    QLinearConcat and moves uint8 data between INT8 kernels, and computes what the simulation does."""
    model, batches, calib, plan = _calibrated(build)
    sites = calib.output_sites(plan)
    assert calib.runs_float(plan) == {}
    assert sum(join.op == "cat" and join.output in sites for join in calib.graph.joins) == concats
    path = export_onnx(model, plan, calib, tmp_path / "int8.onnx")
    graph = optimized_graph(path, tmp_path).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QLinearConcat"] == concats and ops["Conv"] == 0
    assert _float_data_movement(graph) == []
    with torch.no_grad():
        x = torch.cat(batches)
        sim, deployed = apply_plan(model, plan, calib)(x), load_onnx(path, threads=1)(x)
    assert (sim - deployed).abs().max() <= 0.02 * sim.abs().max()  # a rounding tie: one step, not more


def test_a_functional_site_is_shown_and_overridable_in_the_plan(tmp_path):
    model, batches, calib, plan = _calibrated(_tiny_shufflenet)
    sites = calib.output_sites(plan)
    assert sites["stage2.1/cat"] == "output of cat cat_1"
    assert sites["stage2.1/chunk"] == "input of cat cat_1"  # the half passed through untouched
    assert sites["stage2.1/transpose"].startswith("moves data of stage2.1/view")
    assert calib.graph.functional["stage2.1/view"] == ("stage2.1", "view", 1)
    assert sites["stage2.1"].startswith("moves data of stage2.1/contiguous")  # the block returns the shuffle
    simulated = apply_plan(model, plan, calib)
    assert "stage2.1/cat" in simulated.stage2[1].functional_quantizers
    no_cat = Plan(plan.layers, tensors={"stage2.1/cat": "fp32"})
    assert not {"stage2.1/cat", "stage2.1/view", "stage2.1"} & set(calib.output_sites(no_cat))  # nor what it moves
    with torch.no_grad():
        x = batches[0]
        assert (apply_plan(model, no_cat, calib)(x) - model(x)).abs().max() <= 0.1 * model(x).abs().max()
