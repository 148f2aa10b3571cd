"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["## The quantization core (library)", "## Tuning: `tune`", "### Your evaluation on the deployed model",
            "### What the runtime runs: BatchNorm folding and quantizer placement"]


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_example_runs(section, tmp_path, monkeypatch):
    text = README.read_text()
    body = text[text.index(section):]
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README {section}", "exec"), {})
