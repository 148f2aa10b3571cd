"""What the processes working on one study do once between them (`tuner.prepared.SharedStore`
decides who): evaluate the FP32 baseline, calibrate and measure the per-layer error report, and
finish the search; plus the claim on evaluating one plan, and the FP32 ONNX model of the deployed
check's latency, exported by a worker with nothing else to do."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from torch import nn

from .batches import as_batches
from .calibrate import Calibration, calibrate
from .errors import EvaluationError, InvalidArgumentError, Stopped
from .prepared import POLL_S, SharedStore, dump_prepared, load_prepared, once
from .report import LayerReport, layer_report
from .space import SearchSpace

WAIT_S = 0.25  # how often a worker with nothing to evaluate looks for other workers' results
FINISHER_CHECK_S = 5.0  # how often a worker waiting for the one finishing the study checks that it lives
FP32_ONNX = "fp32-onnx"  # the shared entry: the model exported all-FP32 (b"": too large to share)
FP32_ONNX_MAX_BYTES = 256 << 20  # larger FP32 models are exported by the finishing worker, not stored


def _baseline(study: optuna.Study, model: nn.Module, evaluate: Callable[[Any], float], shared: SharedStore,
              worker: str) -> tuple[float | None, int]:
    """The FP32 score, evaluated once per study (kept in its storage). None while another worker
    is evaluating it (`shared` decides who does)."""
    if "baseline" in study.user_attrs:
        return float(study.user_attrs["baseline"]), 0
    if not shared.claim("baseline"):
        return None, 0
    try:
        baseline = float(evaluate(model))
        if not math.isfinite(baseline):
            raise EvaluationError(f"evaluating the FP32 baseline returned {baseline}, not a finite number.")
    except EvaluationError:
        shared.release("baseline")
        raise
    except Exception as exc:
        shared.release("baseline")
        raise EvaluationError(f"evaluating the FP32 baseline failed: {type(exc).__name__}: {exc}") from exc
    if baseline == 0:
        warnings.warn("the FP32 baseline is 0: a relative budget allows no loss at all", stacklevel=5)  # `tune`'s caller
    study.set_user_attr("baseline", baseline)
    study.set_user_attr("baseline_worker", worker)
    shared.save("baseline", repr(baseline).encode())
    return baseline, 1


class SharedBaseline:
    """The study's baseline, waited for when another worker is evaluating it (or evaluated here
    when that worker died and its claim was taken over)."""

    def __init__(self, study, model, evaluate, shared, worker, should_stop) -> None:  # noqa: ANN001
        self.study, self.model, self.evaluate, self.shared, self.worker = study, model, evaluate, shared, worker
        self.should_stop = should_stop
        self.value, self.evaluations = _baseline(study, model, evaluate, shared, worker)

    def __call__(self) -> float:
        while self.value is None:
            self.value, evaluated = _baseline(self.study, self.model, self.evaluate, self.shared, self.worker)
            self.evaluations += evaluated
            if self.value is None:
                if self.should_stop():
                    raise Stopped("stopped while another worker evaluated the FP32 baseline")
                time.sleep(WAIT_S)
        return self.value


def prepare_once(model: nn.Module, calibration: Iterable[Any], space: SearchSpace, shared: SharedStore,
                 should_stop: Callable[[], bool], log) -> tuple[Calibration, LayerReport, bool]:  # noqa: ANN001
    """Calibration and the per-layer report: computed by the first worker of the study, loaded by
    the others (and by a resumed search). Returns them and whether they were computed here."""
    computed: list[tuple[Calibration, LayerReport]] = []
    batches = as_batches(calibration)

    def compute() -> bytes:
        calib = calibrate(model, batches)
        unknown = sorted(set(space.exclude) - set(calib.layers))
        if unknown:
            raise InvalidArgumentError(f"space `exclude` names layers the model does not have: {unknown}.")
        report = layer_report(model, calib, space.settings())
        computed.append((calib, report))
        try:
            return dump_prepared(calib, report)
        except (TypeError, ValueError) as exc:  # something not storable: every worker computes its own
            log(f"[quanttune] the calibration could not be stored for other workers ({exc})")
            return b""

    data, _ = once(shared, f"prepared-{space_key(space)}", compute, should_stop)
    if computed:
        return (*computed[0], True)
    if data:
        try:
            return (*load_prepared(data, model, batches), False)
        except Exception as exc:  # e.g. stored by another version: compute our own
            log(f"[quanttune] the stored calibration could not be loaded ({type(exc).__name__}: {exc}): recalibrating")
    compute()
    return (*computed[0], True)


def point_claim(plan_key: str) -> str:
    """The shared claim on evaluating one plan (two workers choosing at once take different points)."""
    return "point-" + hashlib.sha256(plan_key.encode()).hexdigest()[:24]


def space_key(space: SearchSpace) -> str:
    return hashlib.sha256(json.dumps(space.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def finisher(shared: SharedStore, stop_asked: Callable[[], bool], log,  # noqa: ANN001
             idle: Callable[[], None] = lambda: None) -> bool:
    """Whether this process verifies and returns the result: when several workers end the search,
    one does; the others wait until it has (the job ends: `stop_asked`), or take over if it died.
    A waiting worker calls `idle()` first (work that helps the one finishing)."""
    waiting = False
    next_claim = 0.0
    while not stop_asked():
        if time.monotonic() >= next_claim:
            if shared.claim("result"):
                return True
            next_claim = time.monotonic() + FINISHER_CHECK_S
        if not waiting:
            log("[quanttune] another worker is finishing this study: waiting for it")
            waiting = True
            idle()
            continue
        time.sleep(4 * WAIT_S)
    return False


def fp32_onnx_bytes(model: nn.Module, calib: Calibration) -> bytes:
    """The model exported all-FP32 (`tuner.deployment.export_fp32`) as bytes to share; b"" when it
    is too large to share (or spills into external data)."""
    from .deployment import export_fp32

    with tempfile.TemporaryDirectory() as tmp:
        path = export_fp32(model, calib, f"{tmp}/model-fp32.onnx")
        if path.with_name(path.name + ".data").exists() or path.stat().st_size > FP32_ONNX_MAX_BYTES:
            return b""
        return path.read_bytes()


def share_fp32_onnx(shared: SharedStore, export: Callable[[], bytes], log) -> None:  # noqa: ANN001
    """A worker with nothing to evaluate exports the FP32 model for the deployed check, unless
    another worker has (or is at it), so that the finishing worker only exports its INT8 plan."""
    if not shared.claim(FP32_ONNX):
        return
    started = time.perf_counter()
    try:
        data = export()
    except Exception as exc:  # noqa: BLE001 (the deployed check exports it again and records why it fails)
        log(f"[quanttune] exporting the FP32 model while idle failed ({type(exc).__name__}): left to the deployed check")
        data = b""
    except BaseException:
        shared.release(FP32_ONNX)
        raise
    shared.save(FP32_ONNX, data)
    if data:
        log(f"[quanttune] exported the FP32 model for the deployed check while idle "
            f"({len(data) / 1e6:.1f} MB, {time.perf_counter() - started:.1f}s)")


def fp32_onnx(shared: SharedStore, stop_asked: Callable[[], bool]) -> bytes | None:
    """The FP32 ONNX model for the deployed check, as another worker stored it or once the one
    exporting it now has; None when the deployed check must export it itself (nobody has: the
    claim taken here keeps idle workers from starting it; or it was too large to share)."""
    while True:
        data = shared.load(FP32_ONNX)
        if data is not None:
            return data or None
        if shared.claim(FP32_ONNX) or stop_asked():
            return None
        time.sleep(POLL_S)
