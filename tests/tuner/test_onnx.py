"""ONNX QDQ export and ONNX Runtime deployment: the graph holds our quantization, ONNX Runtime runs
it in INT8 kernels, and the deployed model computes what the simulation measured."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from tuner import (
    FP32,
    InvalidArgumentError,
    LayerConfig,
    Plan,
    QuantizedLayer,
    QuanttuneError,
    apply_plan,
    calibrate,
    export_onnx,
    load_onnx,
)
from tuner.batches import call_model
from tuner.examples import digits
from tuner.onnx_kernels import optimized_graph
from tuner.onnx_runtime import latency, read_metadata, session_options
from tuner.quant import quantize

MSE = LayerConfig(activation="mse", weights="per_channel")


# -- models and data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    model = digits.build_model()
    batches = digits.calibration_data()
    return model, batches, calibrate(model, batches)


@pytest.fixture(scope="module")
def int8_cnn(cnn, tmp_path_factory):
    """The digits CNN fully INT8 (mse inputs, per-channel weights), exported once: (plan, path)."""
    model, batches, cal = cnn
    plan = cal.uniform_plan(MSE)
    assert batches[0].shape[0] == 32  # exported with a batch of 32
    return plan, export_onnx(model, plan, cal, tmp_path_factory.mktemp("int8") / "digits.onnx")


@pytest.fixture(scope="module")
def images(cnn):
    """Calibration images plus noisy copies, so that some values fall outside the calibrated ranges."""
    x = torch.cat(cnn[1])
    return torch.cat([x, (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 2)])


@dataclasses.dataclass
class EncoderOutput:
    pooled: torch.Tensor
    hidden: torch.Tensor


class TinyEncoder(nn.Module):
    """A small transformer layer called with keyword inputs, returning a tuple (or a dataclass)."""

    def __init__(self, vocab: int = 50, dim: int = 32, dataclass_output: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 8)
        self.dataclass_output = dataclass_output

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        scores = self.query(h) @ self.key(h).transpose(1, 2) / h.shape[-1] ** 0.5
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9)
        h = self.norm(h + torch.softmax(scores, -1) @ self.value(h))
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        pooled = self.head(h).mean(1)
        return EncoderOutput(pooled, h) if self.dataclass_output else (pooled, h)


def token_batches(n: int, batch: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + 3 * i  # padded lengths differ from batch to batch
        ids = torch.randint(1, 50, (batch, length), generator=g)
        mask = (torch.arange(length)[None, :] < torch.randint(2, length + 1, (batch, 1), generator=g)).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


# -- helpers -----------------------------------------------------------------------------------


def nodes_by_type(proto: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == op_type]


def value_of(proto: onnx.ModelProto, name: str) -> np.ndarray:
    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def optimized_ops(path, tmp_path) -> list[str]:
    """The operators ONNX Runtime actually runs after its graph optimizations (QDQ fusion)."""
    return [n.op_type for n in optimized_graph(path, tmp_path).graph.node]


def simulated_inputs(simulated: nn.Module, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per simulated INT8 layer: its float input, and the integer codes that input is quantized to
    (after the SmoothQuant division; ONNX rounding)."""
    seen = {}

    def record(name, layer, args):
        x = args[0]
        if layer.input_divisor is not None:
            shape = [1] * x.dim()
            shape[layer.channel_axis] = -1
            x = x / layer.input_divisor.reshape(shape)
        seen[name] = (args[0], quantize(x, layer.act_qparams))

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: record(n, mod, args))
             for n, m in simulated.named_modules() if isinstance(m, QuantizedLayer)]
    with torch.no_grad():
        call_model(simulated, batch)
    for h in hooks:
        h.remove()
    return seen


def deployed_codes(path, tmp_path, layer: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The integer codes ONNX Runtime (INT8 kernels and all) computes for `layer`'s input from the
    tensors in `feed` (graph inputs or intermediate tensors)."""
    target = read_metadata(path)["layers"][layer]["input_codes"]
    sub = tmp_path / f"upto_{layer}.onnx"
    onnx.utils.extract_model(str(path), str(sub), list(feed), [target])
    session = ort.InferenceSession(str(sub), session_options(1), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def assert_within_one_step(path, tmp_path, simulated, x: torch.Tensor, chain: list[str]) -> None:
    """Each INT8 layer of `chain` (in order) gets, on ONNX Runtime, input codes within one step of
    the simulation's, when ONNX Runtime starts from the simulated input of the layer before it
    (the first layer: from its own): each layer's own rounding is checked, not the sum of its
    predecessors' (which compounds)."""
    seen = simulated_inputs(simulated, x)
    layers = read_metadata(path)["layers"]
    for before, layer in zip([None, *chain], chain):
        start = layer if before is None else before  # the first starts from its own simulated input
        feed = {"x": x.numpy(), layers[start]["input"]: seen[start][0].numpy()}
        got = deployed_codes(path, tmp_path, layer, feed).astype(np.int64)
        diff = np.abs(got - seen[layer][1].numpy().reshape(got.shape))
        assert diff.max() <= 1, f"{layer}: deployed input codes differ by {diff.max()} steps"
        assert (diff > 0).mean() < 0.01, f"{layer}: {(diff > 0).mean():.2%} of the codes differ"


# -- the graph ---------------------------------------------------------------------------------


def test_graph_quantizes_exactly_the_int8_layers_with_our_parameters(cnn, tmp_path):
    model, batches, cal = cnn
    plan = Plan({
        "conv1": MSE,
        "conv2": LayerConfig(activation="percentile-99.99", weights="per_tensor"),
        "fc1": MSE,
        "fc2": FP32,
    })
    path = export_onnx(model, plan, cal, tmp_path / "digits.onnx")
    proto = onnx.load(path)
    inits = {i.name: i for i in proto.graph.initializer}
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: n for n in proto.graph.node for o in n.output}

    for name in plan.int8_layers:
        config = plan.layers[name]
        act = cal.activation_qparams(name, config.activation, config.symmetric)
        wqp, _ = cal.weight(name, config.weights)
        # int8 weight initializer -> DequantizeLinear with our weight scales -> the layer's op
        weight = inits[f"{name}.weight"]
        assert weight.data_type == onnx.TensorProto.INT8
        (weight_dq,) = consumers[weight.name]
        assert weight_dq.op_type == "DequantizeLinear"
        scale = value_of(proto, weight_dq.input[1])
        np.testing.assert_array_equal(scale, wqp.scale.numpy())
        assert scale.ndim == (1 if config.weights == "per_channel" else 0)
        (compute,) = consumers[weight_dq.output[0]]
        assert compute.op_type in ("Conv", "Gemm")
        # its input: QuantizeLinear -> DequantizeLinear with the calibration's scale and zero point
        input_dq = producer[compute.input[0]]
        quant = producer[input_dq.input[0]]
        assert (input_dq.op_type, quant.op_type) == ("DequantizeLinear", "QuantizeLinear")
        assert value_of(proto, quant.input[1]) == act.scale.item()
        assert value_of(proto, quant.input[2]) == act.zero_point.item()
        assert value_of(proto, quant.input[2]).dtype == np.uint8  # affine: UINT8

    # the FP32 layer keeps its float weight and a float input
    assert inits["fc2.weight"].data_type == onnx.TensorProto.FLOAT
    (fc2,) = consumers["fc2.weight"]
    assert producer[fc2.input[0]].op_type != "DequantizeLinear"
    # nothing else is quantized: one QDQ pair per INT8 input, one weight DequantizeLinear per INT8 layer
    assert len(nodes_by_type(proto, "QuantizeLinear")) == 3
    assert len(nodes_by_type(proto, "DequantizeLinear")) == 6
    int8 = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert {n for n in int8 if n.endswith(".weight")} == {"conv1.weight", "conv2.weight", "fc1.weight"}

    meta = read_metadata(path)
    assert meta["plan"] == plan.to_dict()
    assert meta["layers"]["fc2"] == {"precision": "fp32"}
    assert meta["layers"]["conv1"]["weight_axis"] == 0 and meta["layers"]["conv2"]["weight_axis"] is None


def test_onnx_runtime_runs_int8_layers_in_int8_kernels(int8_cnn, tmp_path):
    _, path = int8_cnn
    ops = optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 2  # conv1, conv2 (its output quantization moved before the pool)
    assert ops.count("QGemm") == 2  # fc1, fc2
    assert "Conv" not in ops and "Gemm" not in ops and "DequantizeLinear" not in ops


def test_fp32_plan_exports_a_float_model(cnn, tmp_path, images):
    model, _, cal = cnn
    path = export_onnx(model, Plan(), cal, tmp_path / "fp32.onnx")
    proto = onnx.load(path)
    assert not nodes_by_type(proto, "QuantizeLinear") and not nodes_by_type(proto, "DequantizeLinear")
    deployed = load_onnx(path)
    with torch.no_grad():
        torch.testing.assert_close(deployed(images), model(images), rtol=1e-4, atol=1e-4)


def test_file_holds_the_model_and_the_plan_once_not_the_exporters_extras(cnn, int8_cnn, tmp_path):
    """Around the weights the file keeps the graph and our metadata: no exporter signature, debug
    strings, exporter node names or attributes spelled out at their default, and the plan stored
    once (the per-layer descriptions leave out what it says; read_metadata fills that back in)."""
    model, _, cal = cnn
    plan, path = int8_cnn
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert not proto.graph.metadata_props and not proto.graph.value_info
    assert not any(n.HasField("doc_string") or n.metadata_props for n in proto.graph.node)
    assert {n.name.partition("/")[0] for n in proto.graph.node if n.name} == set(plan.int8_layers)
    opset = next(o.version for o in proto.opset_import if o.domain == "")
    for node in proto.graph.node:
        declared = onnx.defs.get_schema(node.op_type, opset).attributes
        for a in node.attribute:
            default = declared[a.name].default_value
            assert not default.name or onnx.helper.get_attribute_value(a) != onnx.helper.get_attribute_value(default)

    stored = json.loads(next(p.value for p in proto.metadata_props if p.key == "quanttune"))
    assert stored["format"] == 2 and stored["plan"] == plan.to_dict()
    for layer in stored["layers"].values():
        assert not {"precision", "weight"} & set(layer) and None not in layer.values()
    meta = read_metadata(path)
    act = cal.activation_qparams("conv1", "mse", False)
    assert meta["layers"]["conv1"] == {
        "precision": "int8", "op": "Conv", "weight": "conv1.weight", "weight_axis": 0, "input": "x",
        "input_divisor": None, "input_codes": stored["layers"]["conv1"]["input_codes"],
        "input_scale": act.scale.item(), "input_zero_point": act.zero_point.item()}

    # files of format 1 (every layer described in full) still read as they are
    old = {**meta, "format": 1}
    next(p for p in proto.metadata_props if p.key == "quanttune").value = json.dumps(old)
    onnx.save(proto, tmp_path / "format1.onnx")
    assert read_metadata(tmp_path / "format1.onnx") == old

    # issue 4's target: fully INT8, the file is at most 30% of the FP32 export
    fp32 = export_onnx(model, Plan(), cal, tmp_path / "fp32.onnx")
    assert path.stat().st_size <= 0.30 * fp32.stat().st_size


# -- deployed == simulated ---------------------------------------------------------------------


def test_deployed_matches_simulated_within_one_step(cnn, int8_cnn, tmp_path, images):
    model, _, cal = cnn
    plan, path = int8_cnn
    simulated = apply_plan(model, plan, cal)
    assert_within_one_step(path, tmp_path, simulated, images, plan.int8_layers)

    deployed = load_onnx(path, threads=1)
    with torch.no_grad():
        got, want = deployed(images), simulated(images)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.99
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert abs(digits.evaluate(deployed) - digits.evaluate(simulated)) <= 0.5


def test_dynamic_batch(cnn, int8_cnn, images):
    model, _, cal = cnn
    plan, path = int8_cnn  # exported with a batch of 32
    deployed = load_onnx(path)
    simulated = apply_plan(model, plan, cal)
    for n in (5, 1, 100):
        with torch.no_grad():
            got, want = deployed(images[:n]), simulated(images[:n])
        assert got.shape == (n, 10)
        assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95


def test_example_of_batch_size_one_still_exports_a_dynamic_batch(cnn, tmp_path, images):
    model, batches, cal = cnn
    path = export_onnx(model, cal.uniform_plan(MSE), cal, tmp_path / "digits.onnx", example=batches[0][:1])
    assert load_onnx(path)(images[:7]).shape == (7, 10)


def test_smoothed_layer(cnn, tmp_path, images):
    model, _, cal = cnn
    smooth = LayerConfig(activation="max", weights="per_channel", smooth=0.5)
    plan = cal.uniform_plan(MSE).replace({"fc1": smooth})
    path = export_onnx(model, plan, cal, tmp_path / "smooth.onnx")
    proto = onnx.load(path)
    meta = read_metadata(path)
    fc1 = meta["layers"]["fc1"]
    (div,) = [n for n in proto.graph.node if n.name == "fc1/input_smooth"]  # x / s, then QuantizeLinear
    assert div.op_type == "Div" and list(div.input) == [fc1["input"], fc1["input_divisor"]]
    np.testing.assert_array_equal(value_of(proto, div.input[1]).reshape(-1), cal.smoothing_factors("fc1", 0.5).numpy())
    assert all(layer["input_divisor"] is None for name, layer in meta["layers"].items() if name != "fc1")
    # the smoothed weight: int8 codes of W * s, with the smoothed layer's scale and zero point
    wqp, fake = cal.weight("fc1", "per_channel", 0.5)
    np.testing.assert_array_equal(value_of(proto, "fc1.weight"), quantize(fake, wqp).numpy().astype(np.int8))
    act = cal.activation_qparams("fc1", "max", False, 0.5)
    assert meta["layers"]["fc1"]["input_scale"] == act.scale.item()

    simulated = apply_plan(model, plan, cal)
    assert_within_one_step(path, tmp_path, simulated, images, ["fc1", "fc2"])
    assert abs(digits.evaluate(load_onnx(path)) - digits.evaluate(simulated)) <= 0.5


def test_symmetric_activation_keeps_the_int8_range_at_minus_127(cnn, tmp_path, images):
    model, _, cal = cnn
    plan = cal.uniform_plan(LayerConfig(activation="percentile-99.9", scheme="symmetric", weights="per_channel"))
    path = export_onnx(model, plan, cal, tmp_path / "symmetric.onnx")
    proto = onnx.load(path)
    clips = nodes_by_type(proto, "Clip")
    assert len(clips) == 4 and all(value_of(proto, c.input[1]) == -127 for c in clips)
    simulated = apply_plan(model, plan, cal)
    assert_within_one_step(path, tmp_path, simulated, images * 3 - 1, plan.int8_layers)  # negative inputs saturate


# -- calling conventions -----------------------------------------------------------------------


@pytest.mark.parametrize("dataclass_output", [False, True])
def test_keyword_inputs_and_structured_outputs(tmp_path, dataclass_output):
    torch.manual_seed(0)
    model = TinyEncoder(dataclass_output=dataclass_output).eval()
    batches = token_batches(3)
    cal = calibrate(model, batches)
    plan = cal.uniform_plan(MSE).fallback(["head"])
    path = export_onnx(model, plan, cal, tmp_path / "encoder.onnx")
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert read_metadata(path)["layers"]["query"]["op"] == "MatMul"  # 3-D input: MatMul, weight axis 1
    ops = optimized_ops(path, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 5

    deployed = load_onnx(path)
    simulated = apply_plan(model, plan, cal)
    test = token_batches(2, batch=6, seed=7)[1]  # a batch size and a length never seen at export
    with torch.no_grad():
        want = simulated(**test)
        for got in (deployed(**test), deployed(test["input_ids"], test["attention_mask"]),
                    deployed(test["input_ids"], attention_mask=test["attention_mask"])):
            if dataclass_output:
                assert isinstance(got, EncoderOutput)
                got, expected = (got.pooled, got.hidden), (want.pooled, want.hidden)
            else:
                assert isinstance(got, tuple) and len(got) == 2
                expected = want
            for g, w in zip(got, expected):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=0, atol=0.05 * float(w.abs().max()))


def test_calling_errors_name_the_inputs(tmp_path):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batches = token_batches(2)
    cal = calibrate(model, batches)
    deployed = load_onnx(export_onnx(model, cal.uniform_plan(MSE), cal, tmp_path / "encoder.onnx"))
    with pytest.raises(InvalidArgumentError, match="attention_mask"):
        deployed(input_ids=batches[0]["input_ids"])
    with pytest.raises(InvalidArgumentError, match="unexpected keyword 'mask'"):
        deployed(batches[0]["input_ids"], mask=batches[0]["attention_mask"])


def test_load_onnx_refuses_files_it_did_not_export(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(QuanttuneError, match="not exported by quanttune"):
        load_onnx(tmp_path / "plain.onnx")
    with pytest.raises(InvalidArgumentError, match="existing ONNX file"):
        load_onnx(tmp_path / "missing.onnx")


def test_latency_times_one_model_or_several_in_turns(cnn, int8_cnn):
    model, batches, _ = cnn
    timing = latency(model, batches[0], runs=5, warmup=1)
    assert timing["runs"] == 5 and 0 < timing["min"] <= timing["median"]
    deployed = load_onnx(int8_cnn[1], threads=1)
    timings = latency({"torch": model, "onnxruntime": deployed}, batches[0], runs=3, warmup=0)
    assert set(timings) == {"torch", "onnxruntime"} and all(t["runs"] == 3 for t in timings.values())
    with pytest.raises(InvalidArgumentError, match="runs >= 1"):
        latency(model, batches[0], runs=0)


def test_latency_alternates_the_order_of_the_turns():
    """The model called right after another starts with the other's data in the caches: every
    other round runs them in reverse order, so no model is always second."""
    calls = []
    models = {name: (lambda x, n=name: calls.append(n)) for name in ("fp32", "int8", "static")}
    latency(models, torch.zeros(1), runs=3, warmup=1)
    assert calls == ["fp32", "int8", "static", "static", "int8", "fp32"] * 2


# -- embeddings --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batches = token_batches(3)
    return model, batches, calibrate(model, batches)


def deployed_tensor(path, tmp_path, name: str, feed: dict[str, np.ndarray]) -> torch.Tensor:
    """The value ONNX Runtime computes for the intermediate tensor `name`."""
    sub = tmp_path / "upto.onnx"
    onnx.utils.extract_model(str(path), str(sub), list(feed), [name])
    session = ort.InferenceSession(str(sub), session_options(1), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, feed)[0])


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_int8_embedding_gathers_int8_rows_then_dequantizes_them(encoder, tmp_path, weights):
    model, _, cal = encoder
    plan = cal.uniform_plan(LayerConfig(activation="mse", weights=weights))
    path = export_onnx(model, plan, cal, tmp_path / "encoder.onnx")
    proto = onnx.load(path)
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: n for n in proto.graph.node for o in n.output}

    # the table is an int8 initializer holding exactly the simulation's codes
    wqp, _ = cal.weight("embed", weights)
    table = value_of(proto, "embed.weight")
    assert table.dtype == np.int8 and table.shape == (50, 32)
    np.testing.assert_array_equal(table, quantize(model.embed.weight.detach(), wqp).numpy())
    # Gather(int8 rows) -> Cast -> Mul by the rows' scales: no DequantizeLinear of the whole table
    (gather,) = consumers["embed.weight"]
    assert gather.op_type == "Gather" and list(gather.input) == ["embed.weight", "input_ids"]
    (cast,) = consumers[gather.output[0]]
    (mul,) = consumers[cast.output[0]]
    assert (cast.op_type, mul.op_type) == ("Cast", "Mul")
    assert cast.attribute[0].i == onnx.TensorProto.FLOAT
    scale_input = next(i for i in mul.input if i != cast.output[0])
    if weights == "per_channel":
        scale_gather = producer[scale_input]
        assert scale_gather.op_type == "Gather" and list(scale_gather.input) == ["embed.weight_scale", "input_ids"]
        np.testing.assert_array_equal(value_of(proto, "embed.weight_scale").reshape(-1), wqp.scale.numpy())
    else:
        assert value_of(proto, scale_input).ndim == 0 and value_of(proto, scale_input) == wqp.scale.item()
    assert not any(n.op_type == "DequantizeLinear" and "embed.weight" in n.input for n in proto.graph.node)
    meta = read_metadata(path)["layers"]["embed"]
    assert meta == {"precision": "int8", "op": "Gather", "weight": "embed.weight",
                    "weight_axis": 0 if weights == "per_channel" else None,
                    "weight_scale": scale_input if weights == "per_tensor" else "embed.weight_scale",
                    "input": "input_ids"}
    assert mul.name == "embed/dequantize" and gather.name == "embed/gather"

    # deployed == simulated: the embedding's rows exactly, the outputs within quantization noise
    simulated = apply_plan(model, plan, cal)
    test = token_batches(2, batch=6, seed=7)[1]
    rows = deployed_tensor(path, tmp_path, mul.output[0], {"input_ids": test["input_ids"].numpy()})
    with torch.no_grad():
        assert torch.equal(rows, simulated.embed(test["input_ids"]))
        want = simulated(**test)
        got = load_onnx(path)(**test)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0.05 * float(w.abs().max()))


def test_fp32_embedding_stays_float(encoder, tmp_path):
    model, _, cal = encoder
    plan = cal.uniform_plan(MSE).fallback(["embed"])
    path = export_onnx(model, plan, cal, tmp_path / "encoder.onnx")
    proto = onnx.load(path)
    embed = next(i for i in proto.graph.initializer if i.name == "embed.weight")
    assert embed.data_type == onnx.TensorProto.FLOAT
    (gather,) = [n for n in proto.graph.node if "embed.weight" in n.input]
    assert gather.op_type == "Gather"  # float rows, used as they are: nothing casts or rescales them
    assert not [n for n in proto.graph.node if gather.output[0] in n.input and n.op_type in ("Cast", "Mul")]
    assert read_metadata(path)["layers"]["embed"] == {"precision": "fp32"}
    assert read_metadata(path)["layers"]["query"]["precision"] == "int8"
    test = token_batches(2, batch=6, seed=7)[1]
    with torch.no_grad():
        want, got = apply_plan(model, plan, cal)(**test), load_onnx(path)(**test)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0.05 * float(w.abs().max()))
