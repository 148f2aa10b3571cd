"""The worker's errors: plain `tuner.QuanttuneError`s that say which input of a job is wrong (and,
for a submission the API checks with the same code, which field). No HTTP here: `api.errors`
maps each class to its status in its one table."""

from __future__ import annotations

from tuner.errors import QuanttuneError


class JobInputError(QuanttuneError):
    """A job's model, data or references cannot be turned into what `tune` takes; `field` names
    the offending input when there is one (`calibration_file`, `spec.model`, ...)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class DisallowedReferenceError(JobInputError):
    """A `module:callable` reference is malformed, outside the allowed modules, or not found."""
