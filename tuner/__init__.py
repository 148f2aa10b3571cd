"""quanttune's tuner: the pure library (no HTTP, no job tables).

    from tuner import tune                      # the search
    from tuner import calibrate, apply_plan, Plan, LayerConfig, layer_report   # the core
"""

from .calibrate import Calibration, calibrate, quantizable_layers
from .deployment import Deployment, check_deployment
from .errors import (
    CalibrationError,
    EvaluationError,
    InvalidArgumentError,
    InvalidPlanError,
    QuanttuneError,
)
from .exported import InvalidArchiveError, export_model, load_exported
from .histogram import METHODS, TensorStats
from .onnx_export import ExportError, export_onnx
from .onnx_kernels import KernelCheck, check_kernels
from .onnx_runtime import load_onnx
from .plan import FP32, LayerConfig, Plan
from .qmodules import QuantizedLayer, apply_plan
from .report import LayerReport, layer_report
from .space import SearchSpace
from .tune import TuneResult, tune

__all__ = [
    "FP32",
    "METHODS",
    "Calibration",
    "CalibrationError",
    "Deployment",
    "EvaluationError",
    "ExportError",
    "InvalidArchiveError",
    "InvalidArgumentError",
    "InvalidPlanError",
    "KernelCheck",
    "LayerConfig",
    "LayerReport",
    "Plan",
    "QuantizedLayer",
    "QuanttuneError",
    "SearchSpace",
    "TensorStats",
    "TuneResult",
    "apply_plan",
    "calibrate",
    "check_deployment",
    "check_kernels",
    "export_model",
    "export_onnx",
    "layer_report",
    "load_exported",
    "load_onnx",
    "quantizable_layers",
    "tune",
]
