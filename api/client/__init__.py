"""The Python SDK of the quanttune service (REST contract: docs/api.md).

    from quanttune import Client          # or: from api.client import Client

    client = Client("http://127.0.0.1:8000", token)          # or QUANTTUNE_URL / QUANTTUNE_TOKEN
    job = client.submit(model, calibration_batches, "tuner.examples.digits:evaluate", max_drop=0.01)
    job.wait(raise_on_miss=True)                            # progress bar; raises if failed or not met
    int8 = job.load_model()                                  # ONNX Runtime, called like `model`

`client.py` (`Client`), `job.py` (`Job`), `transport.py` (the one HTTP helper both use),
`upload.py` (turning models and tensors into upload parts), `errors.py` (the SDK's exceptions),
`progress.py` and `render.py` (the progress bar and the tables the CLI prints).
"""

from __future__ import annotations

from .client import Client
from .errors import (
    APIError,
    AuthenticationError,
    BudgetNotMetError,
    ClientArgumentError,
    ConflictError,
    InvalidInputError,
    JobCancelledError,
    JobFailedError,
    NetworkError,
    NotFoundError,
    QuanttuneClientError,
)
from .job import Job

__all__ = [
    "APIError",
    "AuthenticationError",
    "BudgetNotMetError",
    "Client",
    "ClientArgumentError",
    "ConflictError",
    "InvalidInputError",
    "Job",
    "JobCancelledError",
    "JobFailedError",
    "NetworkError",
    "NotFoundError",
    "QuanttuneClientError",
]
