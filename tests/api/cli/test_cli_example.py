"""`quanttune demo` as a user runs it: a real embedded server (quanttune serve + worker) on a free
port, the example submitted through the SDK, results written, the server stopped; the dashboard URL
printed while the server is up."""

import json
import re
import socket
import sqlite3
import stat
import subprocess
import sys


def test_quanttune_demo_runs_the_service_end_to_end_and_writes_artifacts(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout
    assert "MET" in stdout and "naive INT8" in stdout and "INT8 vs FP32 on ONNX Runtime:" in stdout
    naive = float(re.search(r"naive INT8 \(per-tensor max\) ([\d.]+)%", stdout).group(1))
    assert naive < 50  # the example's naive INT8 really breaks the budget

    report = json.loads((out / "report.json").read_text())
    assert report["met"] and report["deployed_score"] is not None and report["drop"] <= 0.01
    assert set(report["ledger"]) == {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2"}  # tuner.examples.digits_cnn
    for layer, entry in report["ledger"].items():  # every layer's decision is printed
        assert re.search(rf"{layer}\s+│[^│]+│\s+{re.escape(entry['decision'])}\s", stdout), layer
    assert (out / "model.onnx").stat().st_size > 0
    # the worker's deployed check, printed: INT8 kernels x/y, and FP32 vs INT8 per batch size and threads
    deployment = report["deployment"]
    kernels = deployment["kernels"]
    assert kernels["planned_int8"] == len(report["int8_layers"]) > 0
    assert kernels["running_int8"] == kernels["planned_int8"]  # every INT8 layer runs an INT8 kernel
    assert f"ONNX Runtime: {kernels['running_int8']}/{kernels['planned_int8']} planned INT8 layers run INT8 kernels" \
        in stdout
    assert "deployed on ONNX Runtime (CPU)" in stdout and len(deployment["latency"]["rows"]) == 4
    # the speed-up line: one figure per batch size and thread setting, those of the report (timings vary
    # with the machine's load, so only their presence and agreement are checked, never a threshold)
    line = re.search(r"INT8 vs FP32 on ONNX Runtime: (.+)", stdout).group(1)
    speedups = re.findall(r"([\d.]+)x at batch (\d+) \((1 thread|all threads)\)", line)
    assert speedups == [(f"{r['speedup']:.2f}", str(r["batch"]), "1 thread" if r["threads"] == 1 else "all threads")
                        for r in deployment["latency"]["rows"]]
    assert {(int(b), t) for _, b, t in speedups} == {(1, "1 thread"), (1, "all threads"), (32, "1 thread"),
                                                     (32, "all threads")}  # batch 1 and the calibration batch
    for row in deployment["latency"]["rows"]:  # and the table, one row each
        assert re.search(rf"│\s+{row['batch']} │ {row['threads']}\s+│\s+{row['fp32_ms']:.3f} │\s+{row['int8_ms']:.3f} │",
                         stdout), stdout[-3000:]
    assert not (out / "model-fp32.onnx").exists()  # no second measurement: the worker's is reused
    assert json.loads((out / "plan.json").read_text())["version"] == 1

    # it went through the service: a job in the embedded server's database, a private token file
    url = re.search(r"dashboard: (http://127\.0\.0\.1:(\d+))/dashboard/", stdout)
    assert url, stdout[-2000:]
    # printed while the server is up, before the job is submitted, and never after it stopped
    assert url.start() < stdout.index("submitted job") < stdout.index("server stopped")
    assert "/dashboard/" not in stdout[stdout.index("server stopped"):]
    with sqlite3.connect(out / "server" / "quanttune.db") as db:
        assert db.execute("SELECT name, status, met FROM qt_jobs").fetchall() == [("digits demo", "succeeded", 1)]
    assert stat.S_IMODE((out / "server" / "demo-token").stat().st_mode) == 0o600

    # and the server was stopped cleanly (serve exits 0 once its worker stopped)
    assert "server stopped (exit code 0)" in stdout
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(url.group(2)))) != 0
