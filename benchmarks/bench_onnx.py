"""Deployable INT8: latency, file size and accuracy of the ONNX QDQ export on ONNX Runtime.

    python benchmarks/bench_onnx.py [--runs 20] [--threads 1 2] [--cases digits_cnn cnn64 ...] [--json out.json]

Cases: `digits_cnn` and `minilm_wordsim353` from ../shared/bench/<case>/case.py (skipped when that
folder is absent), and `cnn64`: three 64-channel 3x3 convolutions on 32x3x64x64 inputs followed by a
linear classifier (random weights, calibrated on random data); `cnn64-bare` is the same stack
without the classifier, whose last convolution has no INT8 consumer (see the README).

Per case and thread count: median latency of torch FP32, ONNX Runtime FP32 and ONNX Runtime INT8
(timed in turns in the same run, so the ratios are fair on a busy machine), the FP32 and fully INT8
file sizes, how many INT8 layers ONNX Runtime runs in INT8 kernels, and for the bench cases the
metric of the FP32 model, the simulated INT8 model (apply_plan) and the deployed INT8 model.
The plan is fully INT8 with `LayerConfig(activation="mse", weights="per_channel")` for every layer
(embeddings included: weight-only, per-row scales). For a model with embeddings the same plan with
its embeddings kept FP32 is exported and timed too (in the same turns), to show what INT8
embeddings change in file size and latency.

For the bench cases, `tune(max_drop=0.002)` also runs (defaults otherwise, ONNX check on): the accuracy
target (simulated and deployed metric within 0.2% of the FP32 baseline) is checked on the plan it
picks, and the fixed plan's drops are printed beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time
from collections import Counter

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnx.numpy_helper  # noqa: E402
import onnxruntime as ort  # noqa: E402

from tuner import LayerConfig, Plan, apply_plan, calibrate, export_onnx, load_onnx, tune  # noqa: E402
from tuner.onnx_runtime import latency, session_options  # noqa: E402

BENCH = pathlib.Path(os.environ.get("QUANTTUNE_BENCH_DIR", ROOT.parent / "shared" / "bench"))
CONFIG = LayerConfig(activation="mse", weights="per_channel")
INT8_KERNELS = ("QLinearConv", "QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "ConvInteger", "MatMulInteger")
TARGET_SPEEDUP, TARGET_SIZE, TARGET_DROP = 1.8, 0.30, 0.002


class CNN64(nn.Module):
    """Three 64-channel 3x3 convolutions on 3x64x64 images, optionally with a linear classifier."""

    def __init__(self, head: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 8 * 8, 10) if head else None

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        if self.fc is None:
            return self.conv3(x)
        x = torch.max_pool2d(torch.relu(self.conv3(x)), 8)
        return self.fc(torch.flatten(x, 1))


def load_case(name: str):
    path = BENCH / name / "case.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_case_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(names: list[str]):
    """name -> (model, calibration batches, timing batch, evaluate or None)."""
    for name in names:
        if name.startswith("cnn64"):
            torch.manual_seed(0)
            model = CNN64(head=name == "cnn64").eval()
            g = torch.Generator().manual_seed(1)
            batches = [torch.randn(32, 3, 64, 64, generator=g) for _ in range(2)]
            yield name, model, batches, batches[0], None
            continue
        case = load_case(name)
        if case is None:
            print(f"[skip] {name}: {BENCH / name / 'case.py'} not found")
            continue
        batches = case.calibration_data()
        yield name, case.build_model(), batches, batches[0], case.evaluate


def kernel_report(path: pathlib.Path, tmp: pathlib.Path) -> Counter:
    """The operators ONNX Runtime runs after its graph optimizations."""
    options = session_options(threads=1)
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def layer_bytes(path: pathlib.Path, layers: list[str]) -> int:
    """Bytes the named INT8 layers take in the file: int8 weights, their scales and zero points, biases."""
    prefixes = tuple(f"{name}." for name in layers)
    proto = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer if i.name.startswith(prefixes))


def fp32_layer_bytes(model: nn.Module, layers: list[str]) -> int:
    """Bytes the named layers' FP32 parameters take (the FP32 export may rename or transpose them)."""
    return sum(p.numel() * p.element_size() for name in layers for p in model.get_submodule(name).parameters())


def run_case(name, model, batches, timing_batch, evaluate, args, tmp: pathlib.Path) -> dict:
    start = time.perf_counter()
    calibration = calibrate(model, batches)
    plan = calibration.uniform_plan(CONFIG)
    fp32_path = export_onnx(model, Plan(), calibration, tmp / f"{name}-fp32.onnx")
    int8_path = export_onnx(model, plan, calibration, tmp / f"{name}-int8.onnx")
    embeddings = [n for n in plan.int8_layers if calibration.layers[n].weight_only]
    ops = kernel_report(int8_path, tmp)
    row = {
        "case": name,
        "int8_layers": len(plan.int8_layers) - len(embeddings),  # Linear/Conv: the layers with INT8 kernels
        "int8_embeddings": len(embeddings),
        "int8_kernels": sum(ops[k] for k in INT8_KERNELS),
        "kernels": {k: ops[k] for k in INT8_KERNELS if ops[k]},
        "fp32_bytes": fp32_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
        "latency": {},
    }
    row["size_ratio"] = row["int8_bytes"] / row["fp32_bytes"]
    fp32_embed_path = None
    if embeddings:  # the same plan with FP32 embeddings: what INT8 embeddings change
        fp32_embed_path = export_onnx(model, plan.fallback(embeddings), calibration, tmp / f"{name}-int8-fp32emb.onnx")
        row["fp32_embed_bytes"] = fp32_embed_path.stat().st_size
        row["fp32_embed_size_ratio"] = row["fp32_embed_bytes"] / row["fp32_bytes"]
    row["layer_bytes_ratio"] = layer_bytes(int8_path, plan.int8_layers) / fp32_layer_bytes(model, plan.int8_layers)
    torch_threads = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            models = {"torch_fp32": model, "ort_fp32": load_onnx(fp32_path, threads=threads),
                      "ort_int8": load_onnx(int8_path, threads=threads)}
            if fp32_embed_path is not None:
                models["ort_int8_fp32_embed"] = load_onnx(fp32_embed_path, threads=threads)
            timed = latency(models, timing_batch, runs=args.runs, warmup=3)
            t = {k: v["median"] * 1000 for k, v in timed.items()}
            t["int8_vs_ort_fp32"] = t["ort_fp32"] / t["ort_int8"]
            t["int8_vs_torch_fp32"] = t["torch_fp32"] / t["ort_int8"]
            if fp32_embed_path is not None:
                t["int8_embed_vs_fp32_embed"] = t["ort_int8_fp32_embed"] / t["ort_int8"]
            row["latency"][threads] = t
    finally:
        torch.set_num_threads(torch_threads)
    if evaluate is not None:
        baseline = float(evaluate(model))
        simulated = float(evaluate(apply_plan(model, plan, calibration)))
        deployed = float(evaluate(load_onnx(int8_path, threads=max(args.threads))))
        row.update(baseline=baseline, simulated=simulated, deployed=deployed,
                   simulated_drop=(baseline - simulated) / abs(baseline),
                   deployed_drop=(baseline - deployed) / abs(baseline),
                   deployed_vs_simulated=(deployed - simulated) / abs(baseline))
        row["tuned"] = tuned_row(model, batches, evaluate)
    row["seconds"] = time.perf_counter() - start
    return row


def tuned_row(model, batches, evaluate) -> dict:
    """What `tune` delivers with a budget of TARGET_DROP: its plan's simulated score and the score of
    the ONNX file it exported (verify=True), plus that file's size."""
    result = tune(model, batches, evaluate, max_drop=TARGET_DROP, verbose=False)
    return {"baseline": result.baseline, "simulated": result.score, "deployed": result.deployed_score,
            "simulated_drop": result.drop, "deployed_drop": result.deployed_drop, "met": result.met,
            "int8_layers": len(result.int8_layers), "fp32_layers": len(result.fp32_layers),
            "evaluations": result.evaluations, "int8_bytes": len(result.onnx or b""), "plan": result.plan.to_dict()}


def print_markdown(header: list[str], lines) -> None:
    """One markdown table: a header row, its rule, then one row per list of cells."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def print_table(rows: list[dict], threads: list[int]) -> None:
    def per_thread(selected: list[dict]):
        return ((r, t, r["latency"][t]) for r in selected for t in threads)

    print()
    print_markdown(
        ["case", "threads", "torch FP32 ms", "ORT FP32 ms", "ORT INT8 ms", "INT8 vs ORT FP32", "INT8 vs torch",
         "INT8 kernels / INT8 Linear+Conv layers"],
        ([r["case"], str(t), f"{lat['torch_fp32']:.2f}", f"{lat['ort_fp32']:.2f}", f"{lat['ort_int8']:.2f}",
          f"{lat['int8_vs_ort_fp32']:.2f}x", f"{lat['int8_vs_torch_fp32']:.2f}x",
          f"{r['int8_kernels']}/{r['int8_layers']}"] for r, t, lat in per_thread(rows)))
    print()
    no_metric = ["-"] * 5
    print_markdown(
        ["case", "FP32 file", "INT8 file", "INT8/FP32", "layers' own bytes INT8/FP32", "FP32 metric", "simulated",
         "deployed", "sim drop", "deployed drop"],
        ([r["case"], f"{r['fp32_bytes'] / 1e6:.2f} MB ({r['fp32_bytes']} B)",
          f"{r['int8_bytes'] / 1e6:.2f} MB ({r['int8_bytes']} B)", f"{r['size_ratio']:.1%}",
          f"{r['layer_bytes_ratio']:.1%}",
          *([f"{r['baseline']:.3f}", f"{r['simulated']:.3f}", f"{r['deployed']:.3f}",
             f"{r['simulated_drop']:+.3%}", f"{r['deployed_drop']:+.3%}"] if "baseline" in r else no_metric)]
         for r in rows))
    tuned = [r for r in rows if "tuned" in r]
    if tuned:
        print(f"\nThe plan `tune(max_drop={TARGET_DROP})` picks (evaluations include the baseline and the ONNX check):")
        print_markdown(
            ["case", "INT8 / FP32 layers", "evaluations", "FP32 metric", "simulated", "deployed", "sim drop",
             "deployed drop", "INT8 file / FP32 file"],
            ([r["case"], f"{t['int8_layers']} / {t['fp32_layers']}", str(t["evaluations"]), f"{t['baseline']:.3f}",
              f"{t['simulated']:.3f}", f"{t['deployed']:.3f}", f"{t['simulated_drop']:+.3%}",
              f"{t['deployed_drop']:+.3%}", f"{t['int8_bytes'] / r['fp32_bytes']:.1%}"]
             for r in tuned for t in [r["tuned"]]))
    with_embeddings = [r for r in rows if r["int8_embeddings"]]
    if with_embeddings:
        print("\nINT8 embeddings (weight-only, Gather of int8 rows) vs the same plan with FP32 embeddings:")
        print_markdown(
            ["case", "threads", "INT8 file, FP32 embeddings", "INT8 file, INT8 embeddings",
             "ORT INT8 ms, FP32 embeddings", "ORT INT8 ms, INT8 embeddings", "speed ratio"],
            ([r["case"], str(t), f"{r['fp32_embed_bytes'] / 1e6:.2f} MB ({r['fp32_embed_size_ratio']:.1%})",
              f"{r['int8_bytes'] / 1e6:.2f} MB ({r['size_ratio']:.1%})", f"{lat['ort_int8_fp32_embed']:.2f}",
              f"{lat['ort_int8']:.2f}", f"{lat['int8_embed_vs_fp32_embed']:.2f}x"]
             for r, t, lat in per_thread(with_embeddings)))


def print_targets(rows: list[dict]) -> None:
    print("\nTargets (drop = (baseline - x) / |baseline|; a negative drop is a gain):")
    for r in rows:
        checks = []
        if r["case"] == "cnn64" and 1 in r["latency"]:
            s = r["latency"][1]["int8_vs_ort_fp32"]
            verdict = "PASS" if s >= TARGET_SPEEDUP else "FAIL"
            checks.append(f"INT8 {s:.2f}x ORT FP32 at 1 thread (>= {TARGET_SPEEDUP}x: {verdict})")
        checks.append(f"INT8 file {r['size_ratio']:.1%} of FP32 (<= {TARGET_SIZE:.0%}: "
                      f"{'PASS' if r['size_ratio'] <= TARGET_SIZE else 'FAIL'})")
        if "tuned" in r:
            t = r["tuned"]
            worst = max(t["simulated_drop"], t["deployed_drop"])
            checks.append(f"tuned plan ({t['fp32_layers']} FP32 layers): drops sim {t['simulated_drop']:+.3%} / "
                          f"deployed {t['deployed_drop']:+.3%} (<= {TARGET_DROP:.1%}: "
                          f"{'PASS' if worst <= TARGET_DROP else 'FAIL'}); fixed all-mse plan: sim "
                          f"{r['simulated_drop']:+.3%} / deployed {r['deployed_drop']:+.3%}")
        print(f"  {r['case']}: " + "; ".join(checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["digits_cnn", "minilm_wordsim353", "cnn64", "cnn64-bare"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.runs < 20:
        print(f"note: --runs {args.runs} is below the 20 runs the targets are stated for")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, batches, timing_batch, evaluate in cases(args.cases):
            print(f"[{name}] calibrating, exporting, timing ...", flush=True)
            rows.append(run_case(name, model, batches, timing_batch, evaluate, args, pathlib.Path(tmp)))
            print(f"[{name}] done in {rows[-1]['seconds']:.0f} s", flush=True)
    print_table(rows, args.threads)
    print_targets(rows)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
