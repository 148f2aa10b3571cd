"""quanttune: accuracy-aware INT8 post-training quantization tuning.

    from quanttune import Client, tune

`Client` is the service's Python SDK (`api.client`); `tune` is the library's search
(`tuner.tune`). Both are imported on first use, so `import quanttune` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.client import Client
    from api.client_errors import (
        APIError,
        AuthenticationError,
        ConflictError,
        InvalidInputError,
        JobCancelledError,
        JobFailedError,
        NotFoundError,
        QuanttuneClientError,
    )
    from api.client_job import Job
    from tuner import TuneResult, tune

from api import __version__  # light: api/__init__ imports nothing heavy

_LAZY = {
    "Client": "api.client",
    "Job": "api.client_job",
    "QuanttuneClientError": "api.client_errors",
    "APIError": "api.client_errors",
    "AuthenticationError": "api.client_errors",
    "NotFoundError": "api.client_errors",
    "ConflictError": "api.client_errors",
    "InvalidInputError": "api.client_errors",
    "JobFailedError": "api.client_errors",
    "JobCancelledError": "api.client_errors",
    "tune": "tuner",
    "TuneResult": "tuner",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quanttune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
