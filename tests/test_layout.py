"""The layout rules of DESIGN.md section 3 stay true: `tuner` <- `worker` <- `api` (the worker
never loads the web framework), no import cycle, no function over 80 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_worker_and_the_tuner_load_no_web_framework_and_no_api() -> None:
    code = ("import sys, worker.runner, worker.process, worker.migrate, tuner.tuning; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('api', 'fastapi', 'starlette')]; "
            "assert not bad, bad; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_layering_no_import_cycle_and_short_functions() -> None:
    done = subprocess.run([sys.executable, "scripts/check_layout.py", "--max-lines", "80"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
