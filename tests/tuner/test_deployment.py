"""The deployed check: ONNX Runtime's optimized graph says which planned INT8 layers really run INT8
kernels (and why not), and FP32 vs INT8 latency is measured for every result. No timed asserts:
latencies are checked for presence and consistency, never against a threshold."""

from __future__ import annotations

import json
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tuner import FP32, LayerConfig, Plan, apply_plan, calibrate, export_onnx, tune
from tuner.batches import first_samples
from tuner.deployment import Deployment, LatencyRow, LatencyTable, check_deployment, measure_latency
from tuner.examples import digits
from tuner.onnx_kernels import KernelCheck, check_kernels

MSE = LayerConfig(activation="mse", weights="per_channel")


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """The digits CNN, its calibration, and its INT8 (every layer) and FP32 ONNX files."""
    model, batches = digits.build_model(), digits.calibration_data()
    calibration = calibrate(model, batches)
    tmp = tmp_path_factory.mktemp("deployed")
    int8 = export_onnx(model, calibration.uniform_plan(MSE), calibration, tmp / "int8.onnx")
    fp32 = export_onnx(model, Plan.uniform(calibration.layers, FP32), calibration, tmp / "fp32.onnx")
    return model, calibration, int8, fp32


# -- a QDQ graph built by hand: the layers ONNX Runtime cannot fuse stay unfusable whatever the exporter does


def _qdq_graph(path):
    """x -> conv_bn (Conv -> BatchNormalization -> Relu) -> conv_ok (Conv -> Relu -> QuantizeLinear)
    -> conv_add (Conv -> residual Add -> GlobalAveragePool) -> fc (Gemm); and conv_raw, a Conv reading
    the float graph input directly. Every layer has an int8 weight `<layer>.weight` read through
    DequantizeLinear, as quanttune exports them."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(x, name, scale):  # uint8 activation codes, zero point 0 (inputs after ReLU are >= 0)
        s, z = const(f"{name}_s", np.float32(scale)), const(f"{name}_z", np.uint8(0))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"]))
        return f"{name}_dq"

    def weight(layer, shape):
        w = const(f"{layer}.weight", rng.integers(-127, 128, shape, dtype=np.int8))
        s = const(f"{layer}.weight_scale", np.full(shape[0], 0.01, np.float32))
        z = const(f"{layer}.weight_zero_point", np.zeros(shape[0], np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [w, s, z], [f"{layer}_w"], axis=0))
        return f"{layer}_w"

    def conv(layer, x):
        bias = const(f"{layer}.bias", np.zeros(4, np.float32))
        nodes.append(helper.make_node("Conv", [x, weight(layer, (4, 4, 3, 3)), bias], [f"{layer}_out"], pads=[1, 1, 1, 1]))
        return f"{layer}_out"

    x = conv("conv_bn", qdq("x", "in", 0.02))
    ones, zeros = const("bn_one", np.ones(4, np.float32)), const("bn_zero", np.zeros(4, np.float32))
    nodes.append(helper.make_node("BatchNormalization", [x, ones, zeros, zeros, ones], ["bn_out"]))
    nodes.append(helper.make_node("Relu", ["bn_out"], ["relu1"]))
    x = conv("conv_ok", qdq("relu1", "a1", 0.05))
    nodes.append(helper.make_node("Relu", [x], ["relu2"]))
    skip = qdq("relu2", "a2", 0.05)  # conv_ok's output quantized: conv_ok can run as QLinearConv
    x = conv("conv_add", skip)
    nodes.append(helper.make_node("Add", [x, skip], ["residual"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["residual"], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    nodes.append(helper.make_node("Gemm", [qdq("flat", "a3", 0.05), weight("fc", (10, 4))], ["logits"], transB=1))
    nodes.append(helper.make_node("Conv", ["x", weight("conv_raw", (4, 4, 3, 3))], ["raw"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes, "handmade", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    ops = {"conv_bn": "Conv", "conv_ok": "Conv", "conv_add": "Conv", "fc": "Gemm", "conv_raw": "Conv"}
    return {name: {"precision": "int8", "op": op, "weight": f"{name}.weight"} for name, op in ops.items()}


def test_hand_built_qdq_graph_names_each_float_layer_and_why(tmp_path):
    layers = _qdq_graph(tmp_path / "handmade.onnx")
    macs = {"conv_bn": 100, "conv_ok": 300, "conv_add": 400, "fc": 50, "conv_raw": 150}
    check = check_kernels(tmp_path / "handmade.onnx", macs, layers=layers)
    k = check.layers
    assert (k["conv_ok"].kernel, k["conv_ok"].int8) == ("QLinearConv", True)
    assert (k["fc"].kernel, k["fc"].int8) == ("QGemm", True)
    assert check.running_int8 == ["conv_ok", "fc"]
    assert check.running_float == ["conv_bn", "conv_add", "conv_raw"]
    for name in check.running_float:  # a float convolution on its weight dequantized at every call
        assert not k[name].int8 and k[name].kernel in ("Conv", "FusedConv")
        assert k[name].reason.startswith(f"runs as a float {k[name].kernel}, its weight dequantized at every call")
    assert "its Conv's output feeds BatchNormalization, not QuantizeLinear" in k["conv_bn"].reason
    assert "its Conv's output feeds Add, not QuantizeLinear" in k["conv_add"].reason
    assert "its input comes from a graph input, not from DequantizeLinear" in k["conv_raw"].reason
    assert check.int8_macs_planned == 1.0
    assert check.int8_macs_running == pytest.approx(350 / 1000)  # conv_ok + fc of 1000 MACs
    assert check.optimized_ops["QLinearConv"] == 1 and check.optimized_ops["BatchNormalization"] == 1
    assert KernelCheck.from_dict(json.loads(json.dumps(check.to_dict()))).to_dict() == check.to_dict()


def test_every_layer_of_the_digits_example_runs_an_int8_kernel(digits_files):
    _, calibration, int8, _ = digits_files
    check = check_kernels(int8, {n: i.macs for n, i in calibration.layers.items()})  # layers from the file's metadata
    assert check.planned_int8 == check.running_int8 == ["conv1", "conv2", "fc1", "fc2"]
    assert {n: k.kernel for n, k in check.layers.items()} == {
        "conv1": "QLinearConv", "conv2": "QLinearConv", "fc1": "QGemm", "fc2": "QGemm"}
    assert all(k.reason is None for k in check.layers.values())
    assert check.int8_macs_running == check.int8_macs_planned == 1.0
    assert check.layers["conv2"].macs == calibration.layers["conv2"].macs


def test_fp32_layers_are_reported_as_planned_fp32(digits_files, tmp_path):
    model, calibration, _, _ = digits_files
    plan = calibration.uniform_plan(MSE).fallback(["fc1", "fc2"])
    check = check_kernels(export_onnx(model, plan, calibration, tmp_path / "mixed.onnx"),
                          {n: i.macs for n, i in calibration.layers.items()})
    assert check.planned_int8 == ["conv1", "conv2"] and check.layers["fc1"].planned == "fp32"
    assert check.layers["fc1"].kernel is None and not check.layers["fc1"].int8
    assert check.int8_macs_planned == pytest.approx(calibration.coverage(plan)["macs"])
    assert set(check.running_int8) <= {"conv1", "conv2"}
    for name in check.running_float:  # a float layer always says why
        assert check.layers[name].reason.startswith("runs as a float")


# -- latency -------------------------------------------------------------------------------------


def test_latency_fp32_vs_int8_at_batch_1_and_the_calibration_batch_with_1_and_all_threads(digits_files):
    _, calibration, int8, fp32 = digits_files
    table = measure_latency(fp32, int8, calibration.batches[0], runs=2, warmup=1)
    assert table.calibration_batch == 32 and table.runs == 2
    assert [(r.batch, r.threads) for r in table.rows] == [(1, 1), (32, 1), (1, "all"), (32, "all")]
    for row in table.rows:
        assert row.fp32_ms > 0 and row.int8_ms > 0
        assert row.speedup == pytest.approx(row.fp32_ms / row.int8_ms)
    assert table.row(1, 1) is table.rows[0] and table.row(32, "all") is table.rows[3]


def test_first_samples_slices_every_input_of_a_batch():
    ids, mask = torch.zeros(8, 6, dtype=torch.long), torch.ones(8, 6)
    assert first_samples(torch.zeros(8, 3), 1).shape == (1, 3)
    assert [t.shape[0] for t in first_samples((ids, mask), 2)] == [2, 2]
    sliced = first_samples({"input_ids": ids, "attention_mask": mask, "scale": 0.5}, 1)
    assert sliced["input_ids"].shape == (1, 6) and sliced["scale"] == 0.5


def test_check_deployment_records_errors_instead_of_raising(digits_files, tmp_path):
    model, calibration, _, _ = digits_files
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    deployment = check_deployment(model, calibration.uniform_plan(MSE), calibration, broken, latency_runs=1)
    assert deployment.kernels is None and deployment.latency is None
    assert set(deployment.errors) == {"kernels", "latency"}
    assert deployment.summary()["int8_kernels"] is None and deployment.summary()["errors"] == deployment.errors


# -- tune: the deployed check for every result ---------------------------------------------------


def test_tune_reports_kernels_latency_and_never_calls_a_slower_plan_a_plain_success(digits_model, digits_batches,
                                                                                     tmp_path, capsys):
    result = tune(digits_model, digits_batches, digits.evaluate, max_drop=0.01, verbose=True, latency_runs=2)
    printed = capsys.readouterr().out
    assert "[quanttune] ONNX Runtime runs 4 of 4 planned INT8 layers in INT8 kernels (100.0% of MACs)" in printed
    assert "[quanttune] latency on ONNX Runtime, FP32 -> INT8: batch 1 with 1 thread " in printed
    deployment = result.deployment
    assert result.met and deployment is not None and deployment.errors == {}
    assert deployment.kernels.running_int8 == result.int8_layers == ["conv1", "conv2", "fc1", "fc2"]
    assert deployment.kernels.int8_macs_running == result.coverage["macs"] == 1.0
    assert [(r.batch, r.threads) for r in deployment.latency.rows] == [(1, 1), (32, 1), (1, "all"), (32, "all")]
    assert all(r.fp32_ms > 0 and r.int8_ms > 0 for r in deployment.latency.rows)
    slower = deployment.slower_than_fp32()
    # `met` is about accuracy; a plan slower than FP32 anywhere measured is not called a plain success
    assert result.reason.startswith("met, but the deployed INT8 model is slower than FP32") == bool(slower)
    for row in slower:
        assert f"{row.speedup:.2f}x at {row.label()}" in result.reason
    assert not any("run in float" in w for w in result.warnings)

    report = json.loads((result.save(tmp_path / "out")["report.json"]).read_text())
    saved = report["deployment"]
    assert saved["kernels"]["running_int8"] == saved["kernels"]["planned_int8"] == 4
    assert saved["kernels"]["layers"]["conv1"]["kernel"] == "QLinearConv"
    assert len(saved["latency"]["rows"]) == 4 and saved["latency"]["calibration_batch"] == 32
    assert saved["speedup"] == pytest.approx(deployment.speedup(32, 1))
    assert Deployment.from_dict(saved).to_dict() == saved
    assert report["reason"] == result.reason


def test_float_layers_are_warned_about_and_a_slower_plan_is_never_a_plain_success(digits_files, tmp_path):
    model, calibration, _, _ = digits_files
    layers = _qdq_graph(tmp_path / "handmade.onnx")
    deployment = Deployment(
        kernels=check_kernels(tmp_path / "handmade.onnx", layers=layers),
        latency=LatencyTable([LatencyRow(1, 1, 1.0, 2.0), LatencyRow(32, 1, 8.0, 4.0)], runs=1, warmup=0,
                             calibration_batch=32))
    [warning] = deployment.warnings()
    assert warning.startswith("3 of 5 layers planned INT8 run in float on ONNX Runtime: conv_bn runs as a float")
    assert all(f"{n} {deployment.kernels.layers[n].reason}" in warning for n in ("conv_bn", "conv_add", "conv_raw"))
    reason = "trial 0: 5/5 int8, drop 0.10% vs budget 1.00% relative; every layer INT8"
    assert deployment.qualify(reason, met=True) == (
        "met, but the deployed INT8 model is slower than FP32 on ONNX Runtime (0.50x at batch 1 with 1 thread); " + reason)
    assert deployment.qualify("no evaluated plan met the budget", met=False) == (
        "no evaluated plan met the budget; the deployed INT8 model is also slower than FP32 on ONNX Runtime "
        "(0.50x at batch 1 with 1 thread)")
    assert deployment.speedup() == 2.0 and deployment.speedup(1) == 0.5
    summary = deployment.summary()
    assert (summary["int8_layers"], summary["int8_kernels"]) == (5, 2)
    assert [f["layer"] for f in summary["float_layers"]] == ["conv_bn", "conv_add", "conv_raw"]
    assert "feeds BatchNormalization" in summary["float_layers"][0]["reason"]
    faster = Deployment(latency=LatencyTable([LatencyRow(1, 1, 2.0, 1.0)], runs=1, warmup=0, calibration_batch=1))
    assert faster.qualify(reason, met=True) == reason and faster.warnings() == []


def test_a_failing_deployed_evaluation_is_recorded_and_the_result_survives(digits_model, digits_batches):
    from tuner.onnx_runtime import OnnxModule

    def evaluate(model):
        if isinstance(model, OnnxModule):
            raise RuntimeError("this evaluation cannot run the ONNX model")
        return digits.evaluate(model)

    with pytest.warns(UserWarning, match="could not measure the score on ONNX Runtime: the evaluation raised RuntimeError"):
        result = tune(digits_model, digits_batches, evaluate, verbose=False, latency_runs=1)
    assert result.met and result.deployed_score is None and result.evaluations == 3
    assert result.deployment.errors == {"score": (
        "the evaluation raised RuntimeError when run on the ONNX Runtime model (the exported INT8 file wrapped by "
        "tuner.onnx_runtime.OnnxModule, not the PyTorch model): this evaluation cannot run the ONNX model; "
        "the search result and model.onnx are kept")}
    assert result.deployment.kernels.running_int8 == result.int8_layers  # the rest of the check still ran
    assert result.deployment.latency is not None
    assert any("could not measure the score" in w for w in result.warnings)


def test_an_evaluation_written_for_pytorch_runs_on_the_onnx_model(digits_files):
    """The idioms of PyTorch evaluations: the device of the first parameter, .to(device), .eval(),
    inference mode; the ONNX Runtime model runs them as they are."""
    from tuner.onnx_runtime import load_onnx

    _, _, int8, _ = digits_files
    _, _, images, labels = digits._splits()

    def pytorch_style(model):
        device = next(model.parameters()).device
        dtype = next(model.buffers()).dtype
        model = model.to(device).eval()
        model.train(False)
        with torch.inference_mode():
            logits = model(images.to(device, dtype))
        return 100.0 * (logits.argmax(1) == labels.to(device)).float().mean().item()

    deployed = load_onnx(int8)
    assert deployed.device == torch.device("cpu") and deployed.dtype == torch.float32
    assert [p.numel() for p in deployed.parameters()] == [0] and [b.numel() for b in deployed.buffers()] == [0]
    assert deployed.cpu().half().to("cpu", torch.float64) is deployed and next(deployed.parameters()).dtype == torch.float32
    with torch.no_grad():
        no_grad = deployed(images[:8])
    torch.testing.assert_close(no_grad, deployed(images[:8]))
    assert pytorch_style(deployed) == pytest.approx(digits.evaluate(deployed))


def test_tune_with_a_pytorch_style_evaluation_measures_the_deployed_score(digits_model, digits_batches):
    def evaluate(model):
        device = next(model.parameters()).device  # raised StopIteration on the ONNX model before
        model.to(device).eval()
        with torch.no_grad():
            return digits.evaluate(model)

    result = tune(digits_model, digits_batches, evaluate, verbose=False, latency_runs=0, max_trials=2)
    assert result.deployment.errors == {} and result.deployed_score is not None
    assert result.deployed_score == pytest.approx(result.score, abs=1.0)


def test_an_export_failing_in_the_deployed_check_keeps_the_search(digits_model, digits_batches, tmp_path,
                                                                   monkeypatch):
    from tuner import ExportError, onnx_export

    def broken_export(*args, **kwargs):
        raise ExportError("torch.onnx.export failed on DigitsCNN: RuntimeError: unsupported op")

    monkeypatch.setattr(onnx_export, "export_onnx", broken_export)
    log = []
    with pytest.warns(UserWarning, match="the INT8 model could not be exported to ONNX"):
        result = tune(digits_model, digits_batches, digits.evaluate, verbose=True, latency_runs=0, max_trials=2,
                      on_trial=log.append)
    assert result.met and result.deployed_score is None and result.onnx is None
    assert result.evaluations == 2 and log[0]["state"] == "COMPLETE"  # the plan was scored in simulation instead
    assert result.deployment.errors == {"export": "ExportError: torch.onnx.export failed on DigitsCNN: RuntimeError: "
                                                  "unsupported op"}
    saved = result.save(tmp_path / "out")
    assert sorted(saved) == ["plan.json", "report.json"]
    assert json.loads(saved["report.json"].read_text())["deployment"]["errors"] == result.deployment.errors


def test_tune_without_latency_runs_checks_kernels_only(digits_model, digits_batches):
    result = tune(digits_model, digits_batches, digits.evaluate, verbose=False, latency_runs=0)
    assert result.deployment.latency is None and result.deployment.kernels is not None
    assert result.to_dict()["deployment"]["latency"] is None
    assert "slower than FP32" not in result.reason


# -- several workers: the FP32 model the latency is measured against is exported once, by an idle worker


def test_an_idle_workers_fp32_export_is_shared_once_and_used_by_the_deployed_check(digits_model, digits_batches,
                                                                                 monkeypatch):
    from tuner import onnx_export
    from tuner.coordination import FP32_ONNX, fp32_onnx, fp32_onnx_bytes, share_fp32_onnx
    from tuner.prepared import MemoryStore

    store, lines = MemoryStore(), []
    calibration = calibrate(digits_model, digits_batches)
    share_fp32_onnx(store, lambda: fp32_onnx_bytes(digits_model, calibration), lines.append)
    stored = store.load(FP32_ONNX)
    assert stored and onnx.load_from_string(stored).graph.node and "exported the FP32 model" in lines[0]
    share_fp32_onnx(store, lambda: pytest.fail("exported twice"), lines.append)  # stored: nothing to do
    assert fp32_onnx(store, lambda: False) == stored

    exported = []  # every plan exported from here on: the INT8 plan only, the FP32 model came from the store
    real = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda m, plan, *a, **k: exported.append(plan) or real(m, plan, *a, **k))
    result = tune(digits_model, digits_batches, digits.evaluate, max_drop=0.01, shared=store, latency_runs=2)
    assert result.deployment.latency is not None and result.deployment.latency.rows
    assert exported and all(plan.int8_layers for plan in exported)


def test_without_a_shared_fp32_export_the_finishing_worker_exports_it_itself():
    from tuner.coordination import FP32_ONNX, fp32_onnx
    from tuner.prepared import MemoryStore

    store = MemoryStore()
    assert fp32_onnx(store, lambda: False) is None  # nobody has it: the deployed check exports it
    elsewhere: list = []  # and its claim keeps idle workers from starting the same export
    thread = threading.Thread(target=lambda: elsewhere.append(store.claim(FP32_ONNX)))
    thread.start()
    thread.join()
    assert elsewhere == [False]
    too_large = MemoryStore()
    too_large.save(FP32_ONNX, b"")  # an idle worker found it too large to share
    assert fp32_onnx(too_large, lambda: False) is None


def test_export_builds_torchs_function_table_once_and_leaves_torch_as_it_was(digits_files, tmp_path):
    from torch.onnx._internal.exporter import _registration

    from tuner import onnx_export

    model, calibration, first, _ = digits_files
    before = _registration.ONNXRegistry.__dict__["from_torchlib"]
    again = export_onnx(model, calibration.uniform_plan(MSE), calibration, tmp_path / "again.onnx")
    assert again.read_bytes() == first.read_bytes()  # the same file from the shared table
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is before
    tables = list(onnx_export._registries.values())
    assert tables and all(not any("quanttune" in str(op) for op in t.functions) for t in tables)  # our ops: copies only


def test_exports_from_two_threads_at_once_both_succeed(digits_files, tmp_path):
    """Two workers in one process export at once (one its INT8 plan, the other the FP32 model
    while idle): both files come out whole, the same as exported alone."""
    model, calibration, int8, fp32 = digits_files
    plans = {"int8": calibration.uniform_plan(MSE), "fp32": Plan.uniform(calibration.layers, FP32)}
    errors: list = []

    def export(name):
        try:
            for i in range(2):
                export_onnx(model, plans[name], calibration, tmp_path / f"{name}-{i}.onnx")
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(name,)) for name in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(2):
        assert (tmp_path / f"int8-{i}.onnx").read_bytes() == int8.read_bytes()
        assert (tmp_path / f"fp32-{i}.onnx").read_bytes() == fp32.read_bytes()


def test_a_simulation_runs_while_another_thread_exports(digits_files, tmp_path):
    """One worker thread exports a plan (every trial does, on ONNX Runtime) while another runs a
    simulated model whose conv output is quantized (the custom op, eagerly): torch's tracing state
    is process-wide, and this raced (KeyError 'custom') before both took `qdq_ops.TRACE_LOCK`."""
    model, calibration, _, _ = digits_files
    simulated = apply_plan(model, Plan({"conv2": MSE}), calibration)  # conv2 alone INT8: its output is quantized
    assert any(hasattr(m, "output_quantizer") for m in simulated.modules())
    errors: list = []
    exported = threading.Event()

    def simulate():
        try:
            while not exported.is_set():
                with torch.no_grad():
                    simulated(calibration.batches[0])
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    thread = threading.Thread(target=simulate)
    thread.start()
    try:
        for i in range(4):
            export_onnx(model, calibration.uniform_plan(MSE), calibration, tmp_path / f"int8-{i}.onnx")
    finally:
        exported.set()
        thread.join()
    assert not errors, errors


def test_an_idle_export_that_fails_costs_the_search_nothing():
    from tuner.coordination import FP32_ONNX, fp32_onnx, share_fp32_onnx
    from tuner.prepared import MemoryStore

    def broken():
        raise RuntimeError("torch.export could not trace it")

    store, lines = MemoryStore(), []
    share_fp32_onnx(store, broken, lines.append)  # no exception: the worker goes on searching
    assert store.load(FP32_ONNX) == b"" and "failed" in lines[0]
    assert fp32_onnx(store, lambda: False) is None  # the deployed check exports it and records the error
