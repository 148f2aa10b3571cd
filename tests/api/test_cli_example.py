import json
import subprocess
import sys


def test_quanttune_demo_tunes_the_example_and_writes_artifacts(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MET" in proc.stdout and "naive INT8" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["met"] and report["deployed_score"] is not None
    assert set(report["ledger"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert (out / "model.onnx").stat().st_size > 0
    assert json.loads((out / "plan.json").read_text())["version"] == 1
