"""The CLI test modules' environment: a real `quanttune serve` (tests/api/conftest.py) and a token
of the module's own, so each module sees only its jobs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def env(running_server, request: pytest.FixtureRequest) -> dict[str, str]:  # noqa: ANN001
    token = running_server.new_token(request.module.__name__.rpartition(".")[2])
    return {"QUANTTUNE_URL": running_server.url, "QUANTTUNE_TOKEN": token, "COLUMNS": "200"}
