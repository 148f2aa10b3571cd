"""quanttune's tuner: the pure library (no HTTP, no job tables).

    from tuner import calibrate, apply_plan, Plan, LayerConfig, layer_report
"""

from .calibrate import Calibration, calibrate, quantizable_layers
from .errors import (
    CalibrationError,
    EvaluationError,
    InvalidArgumentError,
    InvalidPlanError,
    QuanttuneError,
)
from .histogram import METHODS, TensorStats
from .plan import FP32, LayerConfig, Plan
from .qmodules import QuantizedLayer, apply_plan

__all__ = [
    "FP32",
    "METHODS",
    "Calibration",
    "CalibrationError",
    "EvaluationError",
    "InvalidArgumentError",
    "InvalidPlanError",
    "LayerConfig",
    "Plan",
    "QuantizedLayer",
    "QuanttuneError",
    "TensorStats",
    "apply_plan",
    "calibrate",
    "quantizable_layers",
]
