"""The deployed check: what ONNX Runtime makes of an exported INT8 model, and how fast it runs.

    deployment = check_deployment(model, plan, calibration, "model.onnx")
    deployment.kernels.running_int8          # layers ONNX Runtime runs in INT8 kernels (tuner.onnx_kernels)
    deployment.latency.rows                  # FP32 vs INT8 ms at batch 1 / the calibration batch, 1 / all threads
    deployment.slower_than_fp32()            # the rows where INT8 is slower than FP32

The FP32 reference is the same model exported with an all-FP32 plan. Both files are timed on
ONNX Runtime's CPU provider, in turns on the same inputs (`tuner.onnx_runtime.latency`), with one
intra-op thread and with ONNX Runtime's default (all cores), at batch size 1 and at the size of
the first calibration batch. Each part that fails is recorded in `errors`, never raised: the
check describes a result, it must not lose it. That includes the user's evaluation run on the ONNX
Runtime model (`evaluate_deployed`): an evaluation that only works on the PyTorch model records
its error under "score" (the message says it ran on the ONNX Runtime model) and the search's result
is kept.
"""

from __future__ import annotations

import math
import pathlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .batches import batch_size, first_samples
from .calibrate import Calibration
from .errors import InvalidArgumentError
from .onnx_kernels import KernelCheck, check_kernels
from .plan import FP32, Plan

ALL_THREADS = "all"  # ONNX Runtime's default intra-op thread count: one per physical core


@dataclass(frozen=True)
class LatencyRow:
    """Median milliseconds of one call of the FP32 and the INT8 model, timed in turns."""

    batch: int
    threads: int | str  # 1, or "all"
    fp32_ms: float
    int8_ms: float

    @property
    def speedup(self) -> float:
        """FP32 time over INT8 time: above 1, INT8 is faster."""
        return self.fp32_ms / self.int8_ms if self.int8_ms > 0 else float("inf")

    def label(self) -> str:
        return f"batch {self.batch} with {'1 thread' if self.threads == 1 else f'{self.threads} threads'}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": round(self.speedup, 4)}


@dataclass(frozen=True)
class LatencyTable:
    rows: list[LatencyRow]
    runs: int
    warmup: int
    calibration_batch: int
    seconds: float = 0.0

    def row(self, batch: int, threads: int | str = 1) -> LatencyRow | None:
        return next((r for r in self.rows if r.batch == batch and r.threads == threads), None)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "warmup": self.warmup, "calibration_batch": self.calibration_batch,
                "seconds": round(self.seconds, 3), "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        rows = [LatencyRow(r["batch"], r["threads"], r["fp32_ms"], r["int8_ms"]) for r in data["rows"]]
        return cls(rows, data["runs"], data["warmup"], data["calibration_batch"], data.get("seconds", 0.0))


@dataclass
class Deployment:
    """The deployed INT8 model on ONNX Runtime: its kernels per layer, its latency against FP32,
    and the error of any part that could not be measured."""

    kernels: KernelCheck | None = None
    latency: LatencyTable | None = None
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # who measured the deployed score: "search" (the search scored this very file on ONNX Runtime),
    # "check" (the check evaluated it once more), None (not measured)
    scored_by: str | None = None

    def slower_than_fp32(self) -> list[LatencyRow]:
        """The measured settings where the INT8 model is slower than FP32."""
        return [r for r in self.latency.rows if r.speedup < 1.0] if self.latency else []

    def speedup(self, batch: int | None = None, threads: int | str = 1) -> float | None:
        """INT8 speed-up over FP32 at `batch` (default: the calibration batch size) and `threads`."""
        if self.latency is None:
            return None
        row = self.latency.row(self.latency.calibration_batch if batch is None else batch, threads)
        return row.speedup if row is not None else None

    def describe(self) -> list[str]:
        """One line each: INT8 kernels of the planned INT8 layers, and the latency table."""
        lines = []
        k = self.kernels
        if k is not None:
            share = k.int8_macs_running
            lines.append(f"ONNX Runtime runs {len(k.running_int8)} of {len(k.planned_int8)} planned INT8 layers in "
                         f"INT8 kernels" + (f" ({share:.1%} of MACs)" if share is not None else ""))
        if self.latency is not None:
            lines.append("latency on ONNX Runtime, FP32 -> INT8: " + ", ".join(
                f"{r.label()} {r.fp32_ms:.3g} -> {r.int8_ms:.3g} ms ({r.speedup:.2f}x)" for r in self.latency.rows))
        return lines

    def warnings(self) -> list[str]:
        """What a user must know: the parts that could not be measured, and the layers planned INT8
        that ONNX Runtime runs in float (each with why)."""
        what = {"score": "the score", "kernels": "the INT8 kernels", "latency": "the latency"}
        messages = [f"the deployed check could not measure {what.get(part, part)} on ONNX Runtime: {error}"
                    if part != "export" else f"the INT8 model could not be exported to ONNX (no model.onnx; the "
                    f"plan and report are kept): {error}" for part, error in self.errors.items()]
        floats = self.kernels.running_float if self.kernels else []
        if floats:
            named = "; ".join(f"{n} {self.kernels.layers[n].reason}" for n in floats[:5])
            messages.append(f"{len(floats)} of {len(self.kernels.planned_int8)} layers planned INT8 run in float on "
                            f"ONNX Runtime: {named}" + ("; ..." if len(floats) > 5 else ""))
        return messages

    def qualify(self, reason: str, met: bool) -> str:
        """`reason` as it must read when the INT8 model is slower than FP32 somewhere measured: a
        plan that meets the budget but runs slower is not a plain success."""
        slower = self.slower_than_fp32()
        if not slower:
            return reason
        figures = ", ".join(f"{r.speedup:.2f}x at {r.label()}" for r in slower)
        if met:
            return f"met, but the deployed INT8 model is slower than FP32 on ONNX Runtime ({figures}); {reason}"
        return f"{reason}; the deployed INT8 model is also slower than FP32 on ONNX Runtime ({figures})"

    def summary(self) -> dict[str, Any]:
        """The figures a job listing shows: kernels x/y, MAC shares, latency rows, float layers and why."""
        k = self.kernels
        return {
            "int8_layers": len(k.planned_int8) if k else None,
            "int8_kernels": len(k.running_int8) if k else None,
            "int8_macs_planned": k.int8_macs_planned if k else None,
            "int8_macs_running": k.int8_macs_running if k else None,
            "float_layers": [{"layer": n, "kernel": k.layers[n].kernel, "reason": k.layers[n].reason}
                             for n in k.running_float] if k else [],
            "calibration_batch": self.latency.calibration_batch if self.latency else None,
            "latency": [r.to_dict() for r in self.latency.rows] if self.latency else [],
            "errors": dict(self.errors), "scored_by": self.scored_by,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernels": self.kernels.to_dict() if self.kernels else None,
            "latency": self.latency.to_dict() if self.latency else None,
            "speedup": self.speedup(), "speedup_batch1": self.speedup(1),
            "slower_than_fp32": [r.to_dict() for r in self.slower_than_fp32()],
            "errors": dict(self.errors), "seconds": round(self.seconds, 3), "scored_by": self.scored_by,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        return cls(KernelCheck.from_dict(data["kernels"]) if data.get("kernels") else None,
                   LatencyTable.from_dict(data["latency"]) if data.get("latency") else None,
                   dict(data.get("errors") or {}), data.get("seconds", 0.0), data.get("scored_by"))


KEPT = "; the search result and model.onnx are kept"


def runtime_evaluation_error(exc: BaseException) -> str:
    """Why the user's `evaluate` could not score the ONNX Runtime model."""
    return (f"the evaluation raised {type(exc).__name__} when run on the ONNX Runtime model (the exported "
            f"INT8 file wrapped by tuner.onnx_runtime.OnnxModule, not the PyTorch model)"
            + (f": {str(exc).strip()[:500]}" if str(exc).strip() else ""))


def evaluate_deployed(evaluate: Callable[[nn.Module], Any],
                      path: str | pathlib.Path) -> tuple[float | None, str | None, bool]:
    """The user's `evaluate` on the ONNX file at `path`, run by ONNX Runtime (`load_onnx`): (score,
    error, evaluated): the score, or None and why loading, the evaluation or its value failed;
    `evaluated` says whether `evaluate` was called. Never raises an `Exception`: the search that
    produced the file must survive its deployed check."""
    from .onnx_runtime import load_onnx

    try:
        module = load_onnx(path)
    except Exception as exc:  # noqa: BLE001
        return None, f"ONNX Runtime could not load the exported INT8 model: {type(exc).__name__}: {exc}", False
    try:
        value = evaluate(module)
        score = float(value)
    except Exception as exc:  # noqa: BLE001 (the user's code on a model it may not expect)
        return None, runtime_evaluation_error(exc) + KEPT, True
    if not math.isfinite(score):
        return None, f"the evaluation returned {value!r} on the ONNX Runtime model, not a finite number", True
    return score, None, True


def measure_latency(fp32_path: str | pathlib.Path, int8_path: str | pathlib.Path, batch: Any, *,
                    batch_sizes: Sequence[int] | None = None, threads: Sequence[int | str] = (1, ALL_THREADS),
                    runs: int = 10, warmup: int = 2) -> LatencyTable:
    """FP32 vs INT8 on ONNX Runtime: per thread setting (1, or "all": ONNX Runtime's default) and
    per batch size (default: 1 and the size of `batch`), the median of `runs` calls of each model,
    timed in turns on the first samples of `batch`."""
    from .onnx_runtime import latency, load_onnx

    if not isinstance(runs, int) or runs < 1 or not isinstance(warmup, int) or warmup < 0:
        raise InvalidArgumentError(f"`runs >= 1` and `warmup >= 0` must hold, but got {runs=} and {warmup=}.")
    start = time.perf_counter()
    full = batch_size(batch)
    sizes = sorted(set(batch_sizes if batch_sizes is not None else (1, full)))
    rows = []
    for setting in threads:
        count = None if setting == ALL_THREADS else int(setting)
        models = {"fp32": load_onnx(fp32_path, threads=count), "int8": load_onnx(int8_path, threads=count)}
        for size in sizes:
            timed = latency(models, first_samples(batch, size), runs=runs, warmup=warmup)
            rows.append(LatencyRow(size, setting, round(timed["fp32"]["median"] * 1e3, 4),
                                   round(timed["int8"]["median"] * 1e3, 4)))
    return LatencyTable(rows, runs, warmup, full, time.perf_counter() - start)


def export_fp32(model: nn.Module, calibration: Calibration, path: str | pathlib.Path) -> pathlib.Path:
    """`model` exported to ONNX with every layer FP32: what the INT8 file's latency is measured
    against (the same for every plan)."""
    from .onnx_export import export_onnx

    return export_onnx(model, Plan.uniform(calibration.layers, FP32), calibration, path)


def check_deployment(model: nn.Module, plan: Plan, calibration: Calibration, int8_path: str | pathlib.Path, *,
                     latency_runs: int = 10, fp32_path: str | pathlib.Path | None = None) -> Deployment:
    """Check the INT8 file `int8_path` (exported from `model`, `plan`, `calibration`): which layers
    ONNX Runtime runs in INT8 kernels (MAC shares from the calibration), and its latency against
    the same model exported all-FP32 (`fp32_path`, exported here when None), `latency_runs` calls
    per figure (0: no latency). Errors are recorded in `Deployment.errors`, not raised."""
    if not isinstance(latency_runs, int) or latency_runs < 0:
        raise InvalidArgumentError(f"`latency_runs >= 0` must hold, but got {latency_runs=}.")
    start = time.perf_counter()
    deployment = Deployment()
    try:
        deployment.kernels = check_kernels(int8_path, {n: i.macs for n, i in calibration.layers.items()})
    except Exception as exc:  # noqa: BLE001 (recorded: the check must never lose the result)
        deployment.errors["kernels"] = f"{type(exc).__name__}: {exc}"
    if latency_runs:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if fp32_path is None:
                    fp32_path = export_fp32(model, calibration, pathlib.Path(tmp) / "model-fp32.onnx")
                deployment.latency = measure_latency(fp32_path, int8_path, calibration.batches[0], runs=latency_runs)
        except Exception as exc:  # noqa: BLE001
            deployment.errors["latency"] = f"{type(exc).__name__}: {exc}"
    deployment.seconds = time.perf_counter() - start
    return deployment
