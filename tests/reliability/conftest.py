"""Issue 8 (reliability and security) fixtures: user code that misbehaves on cue, and real
`quanttune serve` / `quanttune worker` processes that tests can stop, kill and restart.

`qt_faults.evals:scripted` is digits' evaluation, except that calls 2, 3, ... (call 1 is the FP32
baseline) follow `$QT_FAULT_SCRIPT`, a comma-separated list of `raise`, `nan`, `hang`, `crash` or `ok`.
Calls are counted across processes in `$QT_FAULT_DIR/calls`, and a hanging call leaves
`$QT_FAULT_DIR/hanging-<pid>`, so a test can tell which process hung and check it is gone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Processes, ServerProcess, pythonpath, user_package
DIGITS = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
          "evaluate": "tuner.examples.digits:evaluate"}
NAIVE = {"activation": ["max"], "scheme": ["affine"], "weights": ["per_tensor"], "smooth": False}  # breaks 1%

FAULTS = '''
import os
import signal
import time
from pathlib import Path

import torch

from tuner.examples import digits


def _call() -> int:
    path = Path(os.environ["QT_FAULT_DIR"]) / "calls"
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def _hang(n):
    Path(os.environ["QT_FAULT_DIR"], f"hanging-{os.getpid()}").write_text(str(n))
    while True:
        time.sleep(0.5)


def scripted(model):
    n = _call()
    script = [s for s in os.environ.get("QT_FAULT_SCRIPT", "").split(",") if s]
    action = script[n - 2] if 2 <= n < 2 + len(script) else "ok"
    if action == "raise":
        raise RuntimeError(f"the evaluation data set is corrupt (call {n})")
    if action == "nan":
        return float("nan")
    if action == "hang":
        _hang(n)
    if action == "crash":  # as a segfault or the OOM killer would
        os.kill(os.getpid(), signal.SIGKILL)
    return digits.evaluate(model)


def hanging_baseline(model):
    _hang(_call())


def slow(model):
    time.sleep(float(os.environ.get("QT_TEST_EVAL_SLEEP", "0.5")))
    return digits.evaluate(model)


def wrong_shape_calibration():
    return [torch.rand(4, 3, 8, 8)]  # digits takes 1 channel
'''


@pytest.fixture
def fault_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`qt_faults` on sys.path and PYTHONPATH; `$QT_FAULT_DIR` an empty directory (returned)."""
    root = user_package(tmp_path / "usercode", "qt_faults", FAULTS)
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", pythonpath(root))
    monkeypatch.setenv("QT_FAULT_DIR", str(state))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # digits trains several times faster on one of 2 busy cores
    yield state
    for name in [m for m in sys.modules if m == "qt_faults" or m.startswith("qt_faults.")]:
        del sys.modules[name]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QUANTTUNE_POLL_SECONDS": "0.3", "OMP_NUM_THREADS": "1",
           "QUANTTUNE_ALLOWED_MODULES": "tuner.examples,qt_faults"}
    env["PYTHONPATH"] = pythonpath()  # this checkout's code, whatever an installed `quanttune` script would import
    env.pop("QUANTTUNE_DB", None)
    procs = Processes(tmp_path, env)
    yield procs
    procs.close()


class Served(ServerProcess):
    """A `quanttune serve` process (API + 1 worker, SQLite) shared by this directory's tests, with
    tokens for alice and bob; user code `qt_faults` is allowed; uploads over 2 MB are refused."""

    tokens: dict[str, str]

    def client(self, who: str | None = None, **kwargs) -> httpx.Client:  # noqa: ANN003
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("reliability-served")
    usercode = user_package(root / "usercode", "qt_faults", FAULTS)
    (root / "faults").mkdir()
    env = {"QUANTTUNE_POLL_SECONDS": "0.3", "QUANTTUNE_MAX_UPLOAD_BYTES": "2000000",
           "QT_FAULT_DIR": str(root / "faults"), "QT_TEST_EVAL_SLEEP": "1"}
    with Served(root, allowed=["qt_faults"], importable=[usercode], env=env) as server:
        server.tokens = {name: server.new_token(name) for name in ("alice", "bob")}
        yield server
