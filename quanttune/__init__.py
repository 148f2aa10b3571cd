"""quanttune: accuracy-aware INT8 post-training quantization tuning.

    from quanttune import Client, tune

`Client` is the service's Python SDK (`api.client`); `tune` is the library's search
(`tuner.tune`), `TuneOptions` its options. Both are imported on first use, so `import quanttune` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.client import (
        APIError,
        AuthenticationError,
        BudgetNotMetError,
        Client,
        ConflictError,
        InvalidInputError,
        Job,
        JobCancelledError,
        JobFailedError,
        NotFoundError,
        QuanttuneClientError,
    )
    from tuner import TuneOptions, TuneResult, tune

from api import __version__  # light: api/__init__ imports nothing heavy

_LAZY = {
    "Client": "api.client",
    "Job": "api.client",
    "QuanttuneClientError": "api.client",
    "APIError": "api.client",
    "AuthenticationError": "api.client",
    "NotFoundError": "api.client",
    "ConflictError": "api.client",
    "InvalidInputError": "api.client",
    "JobFailedError": "api.client",
    "JobCancelledError": "api.client",
    "BudgetNotMetError": "api.client",
    "tune": "tuner",
    "TuneResult": "tuner",
    "TuneOptions": "tuner",
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
