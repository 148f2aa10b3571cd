"""A real `quanttune serve` process (API + one worker, SQLite) shared by the SDK and CLI tests of
this session; each test module gets its own token (`running_server.new_token(name)`), so it sees
only its own jobs.

The server allows references in `tuner.examples` and `qt_clientcode`, a package of user code
written here: `qt_clientcode.evals:slow` (digits.evaluate after a sleep, to have a job to cancel
while it runs) and `qt_clientcode.evals:torch_only` (written for PyTorch: it raises on the ONNX
Runtime model of the deployed check).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import ServerProcess, user_package


@pytest.fixture(scope="session")
def running_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("served")
    usercode = user_package(root / "usercode", "qt_clientcode", '''
        import time
        from tuner.examples import digits

        def slow(model):
            time.sleep(1.0)
            return digits.evaluate(model)

        def torch_only(model):
            device = next(model.parameters()).device
            if not any(p.numel() for p in model.parameters()):  # the ONNX Runtime model has no weights
                raise TypeError(f"expected a PyTorch model with weights on {device}")
            return digits.evaluate(model)
    ''')
    with ServerProcess(root, allowed=["qt_clientcode"], importable=[usercode]) as server:
        yield server
