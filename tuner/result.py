"""`TuneResult`, what `tune` returns, and the end of a search: the result of the best plan found,
with its reason, checked once more on ONNX Runtime (`verify`)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from .calibrate import Calibration
from .deployment import Deployment
from .plan import Plan
from .report import LayerReport
from .study import Budget, Outcome


@dataclass
class TuneResult:
    met: bool
    baseline: float
    score: float | None
    drop: float | None
    plan: Plan
    model: nn.Module
    coverage: dict[str, float]
    evaluations: int
    trials: list[dict[str, Any]]
    ledger: dict[str, dict[str, Any]]
    reason: str
    study_name: str
    budget: dict[str, Any]
    seconds: dict[str, float]
    stopped: bool = False
    deployed_score: float | None = None
    deployed_drop: float | None = None
    warnings: list[str] = field(default_factory=list)
    deployment: Deployment | None = None  # the deployed check: ONNX Runtime's kernels per layer, latency vs FP32
    calibration: Calibration | None = field(default=None, repr=False)
    original: nn.Module | None = field(default=None, repr=False)
    onnx: bytes | None = field(default=None, repr=False)  # the model `verify` exported and measured

    @property
    def int8_layers(self) -> list[str]:
        return self.plan.int8_layers

    @property
    def fp32_layers(self) -> list[str]:
        return self.plan.fp32_layers

    def export_onnx(self, path: str | Path) -> Path:
        """Write the chosen plan as an ONNX QDQ model that ONNX Runtime executes in INT8."""
        from .onnx_export import export_onnx

        return export_onnx(self.original, self.plan, self.calibration, path)

    def to_dict(self) -> dict[str, Any]:
        """The report: figures, plan, per-layer ledger and trials (JSON-serialisable)."""
        return {
            "met": self.met, "reason": self.reason, "baseline": self.baseline, "score": self.score,
            "drop": self.drop, "deployed_score": self.deployed_score, "deployed_drop": self.deployed_drop,
            "budget": self.budget, "coverage": self.coverage, "evaluations": self.evaluations,
            "int8_layers": self.int8_layers, "fp32_layers": self.fp32_layers, "study_name": self.study_name,
            "stopped": self.stopped, "seconds": self.seconds, "warnings": self.warnings,
            "deployment": self.deployment.to_dict() if self.deployment is not None else None,
            "plan": self.plan.to_dict(), "ledger": self.ledger, "trials": self.trials,
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write `model.onnx`, `plan.json` and `report.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"plan.json": directory / "plan.json", "report.json": directory / "report.json"}
        paths["plan.json"].write_text(self.plan.to_json())
        paths["report.json"].write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))
        if self.onnx is not None:  # the very file verified on ONNX Runtime: no second export
            paths["model.onnx"] = directory / "model.onnx"
            paths["model.onnx"].write_bytes(self.onnx)
        elif self.deployment is not None and "export" in self.deployment.errors:
            pass  # the export failed in the deployed check (the reason is in the report): no model.onnx
        else:
            paths["model.onnx"] = self.export_onnx(directory / "model.onnx")
        return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def reason_of(best: Outcome, plan: Plan, budget: Budget, stopped: bool) -> str:
    n_fp32 = len(plan.fp32_layers)
    where = f"trial {best.number}: {plan.summary()}, drop {budget.format(best.drop)} vs budget {budget.describe()}"
    if best.met:
        tail = "every layer INT8" if n_fp32 == 0 else f"{n_fp32} layer(s) FP32: {', '.join(plan.fp32_layers[:5])}"
        return f"{where}; {tail}"
    return (f"no evaluated plan met the budget{' before the search was stopped' if stopped else ''}; "
            f"the closest is {where}")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({
            "number": t.number, "state": t.state.name, "summary": a.get("summary"), "score": a.get("score"),
            "drop": a.get("drop"), "coverage": a.get("coverage"), "fp32_layers": a.get("fp32_layers", []),
            "duration_s": a.get("duration_s"), "overhead_s": a.get("overhead_s"), "error": a.get("error"),
            "duplicate_of": a.get("duplicate_of"), "params": dict(t.params),
        })
    return rows


def verify(result: TuneResult, evaluate, budget: Budget, report: LayerReport, tolerance: float, log,
           latency_runs: int, fp32_onnx: Callable[[], bytes | None] = lambda: None, *,
           evaluated: Path | None = None, runtime_error: str | None = None) -> None:
    """Check what ONNX Runtime runs for the chosen plan and how fast against FP32
    (`result.deployment`), and its score on ONNX Runtime (the score users will deploy).
    `evaluated`: the chosen plan's ONNX file, already evaluated on ONNX Runtime by the search (its
    score is the deployed score: no evaluation here); else the plan is exported and evaluated once,
    unless `runtime_error` says the user's evaluate cannot run an ONNX Runtime model. `fp32_onnx()`
    gives the FP32 ONNX model when another worker already exported it (None: exported here)."""
    import tempfile

    from .deployment import KEPT, Deployment, check_deployment, evaluate_deployed

    with tempfile.TemporaryDirectory() as tmp:
        try:  # the search's result must survive whatever the export, ONNX Runtime or the evaluation does here
            path = evaluated if evaluated is not None else result.export_onnx(Path(tmp) / "model.onnx")
        except Exception as exc:  # noqa: BLE001 (recorded: save() then writes no model.onnx)
            result.deployment = Deployment(errors={"export": f"{type(exc).__name__}: {exc}"})
            _judge_deployment(result, log)
            return
        if not path.with_name(path.name + ".data").exists():  # a single file (under 2 GB): keep it for `save`
            result.onnx = path.read_bytes()
        if evaluated is not None:
            deployed, error = result.score, None
        elif runtime_error is not None:
            deployed, error = None, runtime_error + KEPT
        else:
            deployed, error, called = evaluate_deployed(evaluate, path)
            result.evaluations += called
        result.deployment = check_deployment(result.original, result.plan, result.calibration, path,
                                             latency_runs=latency_runs,
                                             fp32_path=_shared_fp32(fp32_onnx, Path(tmp)) if latency_runs else None)
    if error is not None:
        result.deployment.errors["score"] = error
    if deployed is not None:
        result.deployment.scored_by = "search" if evaluated is not None else "check"
        _deployed_score(result, deployed, budget, report, tolerance, log)
    _judge_deployment(result, log)


def _shared_fp32(fp32_onnx: Callable[[], bytes | None], directory: Path) -> Path | None:
    """The shared FP32 ONNX model written to `directory`, or None (check_deployment exports it)."""
    try:
        data = fp32_onnx()
    except Exception:  # noqa: BLE001 (e.g. the database hiccuped: export it here instead)
        return None
    if not data:
        return None
    path = directory / "model-fp32.onnx"
    path.write_bytes(data)
    return path


def _deployed_score(result: TuneResult, deployed: float, budget: Budget, report: LayerReport, tolerance: float,
                    log) -> None:
    result.deployed_score = deployed
    result.deployed_drop = budget.drop(result.baseline, deployed)
    gap = abs(deployed - result.score) / (abs(result.baseline) or 1.0)
    log(f"[quanttune] deployed (ONNX Runtime) score {deployed:.6g}, drop {budget.format(result.deployed_drop)}")
    if gap > tolerance or not budget.met(result.deployed_drop) and result.met:
        suspects = sorted(result.plan.int8_layers, key=lambda n: report.layers[n].sqnr_of(result.plan.config(n)))[:3]
        warn(result, f"the deployed model scores {deployed:.6g} against {result.score:.6g} simulated "
                      f"(gap {gap:.3%} of the baseline); the layers most likely responsible (lowest SQNR): "
                      f"{', '.join(suspects)}")


def warn(result: TuneResult, message: str, stacklevel: int = 6) -> None:
    result.warnings.append(message)
    warnings.warn(message, stacklevel=stacklevel)  # the caller of `tune`


def _judge_deployment(result: TuneResult, log) -> None:
    """Log the deployed check; warn about what could not be measured and about planned INT8 layers
    that run in float; never call a plan slower than FP32 a plain success (the reason says so;
    `met` stays about accuracy)."""
    for line in result.deployment.describe():
        log(f"[quanttune] {line}")
    for message in result.deployment.warnings():
        warn(result, message)
    result.reason = result.deployment.qualify(result.reason, result.met)
