"""The one exception family of quanttune: every error a user can cause derives from `QuanttuneError`."""

from __future__ import annotations


class QuanttuneError(Exception):
    """Base class of every error quanttune raises on purpose."""


class InvalidArgumentError(QuanttuneError, ValueError):
    """An argument breaks a documented rule; the message states the rule and the value."""


class InvalidPlanError(InvalidArgumentError):
    """A plan is malformed or does not fit the model it is applied to."""


class CalibrationError(QuanttuneError):
    """The calibration data could not be run through the model."""


class EvaluationError(QuanttuneError):
    """The user's evaluation function failed where the search cannot go on (the FP32 baseline)."""
