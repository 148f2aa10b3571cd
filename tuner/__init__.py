"""quanttune's tuner: the pure library (no HTTP, no job tables).

    from tuner import tune, TuneOptions         # the search
    from tuner import calibrate, apply_plan, Plan, LayerConfig, layer_report   # the core

Names are imported on first use (PEP 562), so that `import tuner.options` or `tuner.errors`
(what the SDK and the service's schemas need) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import (
    CalibrationError,
    EvaluationError,
    ExportError,
    GraphError,
    InvalidArchiveError,
    InvalidArgumentError,
    InvalidPlanError,
    QuanttuneError,
)
from .options import TuneOptions

if TYPE_CHECKING:
    from .apply import apply_plan
    from .calibrate import Calibration, calibrate, quantizable_layers
    from .deployment import Deployment, check_deployment
    from .histogram import METHODS, TensorStats
    from .onnx_export import export_onnx
    from .onnx_kernels import KernelCheck, check_kernels
    from .onnx_runtime import load_onnx
    from .plan import FP32, LayerConfig, Plan
    from .pt2_archive import export_model, load_exported
    from .qmodules import QuantizedLayer
    from .report import LayerReport, layer_report
    from .result import TuneResult
    from .space import SearchSpace
    from .tuning import tune

_LAZY = {
    "Calibration": "calibrate", "calibrate": "calibrate", "quantizable_layers": "calibrate",
    "Deployment": "deployment", "check_deployment": "deployment",
    "METHODS": "histogram", "TensorStats": "histogram",
    "export_onnx": "onnx_export",
    "KernelCheck": "onnx_kernels", "check_kernels": "onnx_kernels",
    "load_onnx": "onnx_runtime",
    "FP32": "plan", "LayerConfig": "plan", "Plan": "plan",
    "export_model": "pt2_archive", "load_exported": "pt2_archive",
    "QuantizedLayer": "qmodules", "apply_plan": "apply",
    "LayerReport": "report", "layer_report": "report",
    "TuneResult": "result",
    "SearchSpace": "space",
    "tune": "tuning",
}

__all__ = sorted([
    *_LAZY, "CalibrationError", "EvaluationError", "ExportError", "GraphError", "InvalidArchiveError",
    "InvalidArgumentError", "InvalidPlanError", "QuanttuneError", "TuneOptions",
])


# Submodules named like the function they define: the name means the function, as it did when this
# package imported everything eagerly (the import system sets the submodule on its package).
_SHADOWED = frozenset({"calibrate"})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules; `tuner.calibrate` stays the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
