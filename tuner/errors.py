"""The one exception family of quanttune: every error a user can cause derives from `QuanttuneError`."""

from __future__ import annotations


class QuanttuneError(Exception):
    """Base class of every error quanttune raises on purpose."""


class InvalidArgumentError(QuanttuneError, ValueError):
    """An argument breaks a documented rule; the message states the rule and the value."""


class InvalidPlanError(InvalidArgumentError):
    """A plan is malformed or does not fit the model it is applied to."""


class BatchMismatchError(InvalidArgumentError):
    """A batch does not run through the model (shape, dtype or inputs): the data is at fault.
    `batch` describes it (`input: float32[32, 5]`), `cause` is what running it raised."""

    def __init__(self, what: str, batch: str, cause: str) -> None:
        self.batch, self.cause = batch, cause
        super().__init__(f"{what} ({batch}) does not fit the model: running it raised {cause}. Check its shape, "
                         "dtype and input names against what the model's forward takes.")


class CalibrationError(QuanttuneError):
    """The calibration data could not be run through the model."""


class EvaluationError(QuanttuneError):
    """The user's evaluation function failed where the search cannot go on (the FP32 baseline)."""


class InvalidArchiveError(InvalidArgumentError):
    """A file is not a torch.export archive that quanttune accepts; the message says why."""


class ExportError(QuanttuneError):
    """The model could not be exported to ONNX (the message says which step failed and why)."""


class GraphError(ExportError):
    """The exported graph does not have the structure the plan asks for."""


class Stopped(QuanttuneError):
    """Waiting for another worker's preparation was cut short by a stop request."""
