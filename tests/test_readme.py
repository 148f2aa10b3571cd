"""The README's Python examples run as written; "Tune your own model" runs end to end: its file
written, its library example run, its `quanttune serve` started as written (on a free port), its
SDK example and its shell commands run against that server."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["## The quantization core (library)", "## Tuning: `tune`", "### Your evaluation on the deployed model",
            "### What the runtime runs: BatchNorm folding and quantizer placement"]
OWN_MODEL = "## Tune your own model"


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_example_runs(section, tmp_path, monkeypatch):
    text = README.read_text()
    body = text[text.index(section):]
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README {section}", "exec"), {})


def _blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of `section`, up to the next `## ` heading."""
    text = README.read_text()
    body = text[text.index(section) + len(section):]
    body = body[:body.index("\n## ")] if "\n## " in body else body
    return re.findall(r"```(\w+)\n(.*?)```", body, re.S)


def _commands(code: str) -> list[list[str]]:
    """The `quanttune ...` commands of a bash block (continuations joined, comments dropped)."""
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("quanttune ")]


def test_readme_tune_your_own_model(tmp_path, monkeypatch, free_port):
    from tests.support import Processes, pythonpath

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**os.environ, "PYTHONPATH": pythonpath(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for name in ("QUANTTUNE_ALLOWED_MODULES", "QUANTTUNE_CODE_DIRS", "QUANTTUNE_DB", "QUANTTUNE_DATA_DIR"):
        env.pop(name, None)
    processes = Processes(tmp_path, env)
    python, ran = [], []
    try:
        for language, code in _blocks(OWN_MODEL):
            first = code.splitlines()[0]
            if language == "python" and re.fullmatch(r"# (\w+\.py)", first):  # the user's file
                (tmp_path / first[2:]).write_text(code)
            elif language == "python":
                namespace: dict = {}
                exec(compile(code, f"README {OWN_MODEL} block {len(python) + 1}", "exec"), namespace)  # noqa: S102
                python.append(namespace)
            for command in _commands(code) if language == "bash" else []:
                ran.append(_run(command, processes, free_port, env, monkeypatch))
    finally:
        processes.close()
    library, service = python
    assert library["result"].met and library["result"].fp32_layers == []
    assert service["info"].met and service["info"].evaluation_source == "cancer_mlp:evaluate"
    assert sorted(p.name for p in (tmp_path / "cancer-int8-service").iterdir()) == ["model.onnx", "plan.json", "report.json"]
    assert ran[0] == "serve" and "met" in ran[1].lower()


def _run(command: list[str], processes, free_port, env: dict, monkeypatch) -> str:
    from tests.support import quanttune, wait_http

    assert command[0] == "quanttune"
    if command[1] == "serve":  # as written, on a free port; the token it prints is the user's
        port = free_port()
        server = processes.start("serve", *command[1:], "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        wait_http(url, processes, process=server)
        log = processes.log("serve")
        assert "references allowed in modules tuner.examples, cancer_mlp (--allow)" in log
        assert f"dashboard: {url}/dashboard/" in log
        token = re.search(r"created one named 'default': (\S+)", log).group(1)
        for name, value in (("QUANTTUNE_URL", url), ("QUANTTUNE_TOKEN", token)):
            monkeypatch.setenv(name, value)
            env[name] = value
        return "serve"
    done = subprocess.run(quanttune(*command[1:]), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_readme_order_quick_start_then_your_own_model_then_reference():
    text = README.read_text()
    assert text.startswith("# quanttune\n\n```bash\nbash scripts/install.sh && quanttune demo ")
    assert "\nbash scripts/test.sh " in text[:400]  # the suite's command, also `.ci/run`'s
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "Tune your own model" and headings[1] == "The quantization core (library)"
    assert (README.parent / "docs" / "benchmarks.md").is_file() and "](docs/benchmarks.md" in text
