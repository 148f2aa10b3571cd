"""Plans evaluated as deployed: each plan the search evaluates is exported to ONNX and the user's
`evaluate` runs on ONNX Runtime (`load_onnx`), the model users ship.

Why: the budget is then checked on the deployed model's score, not on a PyTorch simulation of it
(on MiniLM's sentiment case the two differed by up to 0.2% of the baseline, close to a 0.25%
budget), and the deployed check of the chosen plan needs no evaluation of its own: the file it
checks is the file that was evaluated (one evaluation fewer per search; at a tight budget, room
for one more full-INT8 plan within the same number of evaluations).

Each plan costs an export (MiniLM-L6: about 7 s; a small CNN: about 1 s). When the export,
ONNX Runtime or the user's `evaluate` on the ONNX Runtime model fails, the plans are evaluated in
simulation for the rest of the search (`reason` says why) and the deployed check evaluates the
chosen plan's file as before.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from torch import nn

from .apply import apply_plan
from .calibrate import Calibration
from .deployment import runtime_evaluation_error
from .plan import Plan

class RuntimeTrials:
    """Builds the model each plan is evaluated on, and keeps the file of the best plan so far
    (`keep`), so that the deployed check reuses it."""

    def __init__(self, model: nn.Module, calibration: Calibration, log: Callable[[str], None]):
        self.model, self.calibration, self.log = model, calibration, log
        self._dir = tempfile.TemporaryDirectory(prefix="quanttune-trials-")
        self.files: dict[str, pathlib.Path] = {}  # plan key -> the ONNX file evaluated for it
        self.reason: str | None = None  # why plans are evaluated in simulation instead (None: they are not)
        self.evaluate_error: str | None = None  # the user's evaluate failed on an ONNX Runtime model
        self.extra_calls = 0  # calls of `evaluate` on an ONNX Runtime model that were then repeated in simulation
        self.proven = False  # an evaluation on an ONNX Runtime model has succeeded here
        self._built: tuple[nn.Module | None, Plan | None] = (None, None)  # the last ONNX Runtime model built, its plan

    def build(self, plan: Plan) -> nn.Module:
        """The ONNX Runtime model of `plan` (its file kept under its key), or its simulation once
        the runtime has failed."""
        if self.reason is None:
            from .onnx_export import export_onnx
            from .onnx_runtime import load_onnx

            folder = pathlib.Path(self._dir.name) / hashlib.sha256(plan.key().encode()).hexdigest()[:16]
            try:
                folder.mkdir(exist_ok=True)
                path = export_onnx(self.model, plan, self.calibration, folder / "model.onnx")
                module = load_onnx(path)
            except Exception as exc:  # noqa: BLE001 (the search goes on in simulation; the reason is reported)
                self._give_up(f"the plan could not be exported and loaded on ONNX Runtime "
                              f"({type(exc).__name__}: {str(exc).strip()[:300]})")
            else:
                self.files[plan.key()] = path
                self._built = (module, plan)  # for `evaluate` to fall back to the plan's simulation
                return module
        return apply_plan(self.model, plan, self.calibration, share_weights=True)

    def evaluate(self, evaluate: Callable[[nn.Module], Any], candidate: nn.Module) -> Any:
        """`evaluate(candidate)`. Until an evaluation on an ONNX Runtime model has succeeded here, one
        that raises is repeated on the plan's simulation: if that works, `evaluate` cannot run ONNX
        Runtime models (it reads weights, say) and the search goes on in simulation; if that raises
        too, the error is the plan's (a failed trial, as in simulation). Once one has succeeded, an
        error is the plan's at once (a failed plan is a verdict, not retried)."""
        module, plan = self._built
        if candidate is not module:  # a simulation: the runtime failed to build this plan
            return evaluate(candidate)
        self._built = (None, None)
        try:
            value = evaluate(candidate)
        except Exception as exc:  # noqa: BLE001 (re-raised below unless the simulation tells it apart)
            if self.proven:
                raise
            error = exc
        else:
            self.proven = True
            return value
        self.extra_calls += 1
        value = evaluate(apply_plan(self.model, plan, self.calibration, share_weights=True))
        self.evaluate_error = runtime_evaluation_error(error)
        self._give_up(self.evaluate_error)
        self.files.pop(plan.key(), None)
        return value

    def keep(self, plan_keys: set[str]) -> None:
        """Delete the files of every plan but these (the best so far): a search may evaluate dozens."""
        for key in [k for k in self.files if k not in plan_keys]:
            shutil.rmtree(self.files.pop(key).parent)

    def close(self) -> None:
        self.files.clear()
        self._dir.cleanup()

    def _give_up(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.log(f"[quanttune] plans are evaluated in simulation from now on: {reason}")
