"""A job's inputs as `tune` takes them: its spec and uploads turned into (model, calibration
batches, evaluate), and the one check that data fits a model (run on the first batch), used by
the API on uploads and by the workers on factory models."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tuner.errors import QuanttuneError

from . import evaluators
from .errors import JobInputError
from .references import resolve
from .settings import Settings
from .spec import JobSpec
from .tensorfiles import check_dataset, describe_batch, labels, read_tensors, to_batches

Files = dict[str, tuple[str, bytes]]  # role -> (filename, data)


@dataclass(frozen=True)
class Allowed:
    """Where the job's references may point: module prefixes, and the directories they import from."""

    modules: Sequence[str]
    code_dirs: Sequence[Path]


@dataclass
class Inputs:
    model: nn.Module
    calibration: list[Any]
    evaluate: Callable[[nn.Module], float]


def check_fits(model: Any, batch: Any, what: str, *, field: str | None = None, limit: int = 500) -> None:
    """Run `model` on `batch`; `JobInputError` "<what> (<the batch's shapes>) raised <error>" when
    it fails (wrong shape, dtype or input names), naming `field`."""
    import torch

    from tuner.batches import call_model

    try:
        with torch.no_grad():
            call_model(model, batch)
    except Exception as exc:
        raise JobInputError(f"{what} ({describe_batch(batch)}) raised {type(exc).__name__}: "
                            f"{str(exc).strip()[:limit]}", field=field) from None


def build_inputs(spec: JobSpec, files: Files, settings: Settings, workdir: Path) -> Inputs:
    """The job's model, calibration batches and evaluation; `JobInputError` with the reason when
    the user's factory or data fails."""
    allowed = Allowed(settings.allowed_modules, settings.code_dirs)
    try:
        model = _model(spec, files, allowed, workdir)
        calibration = _calibration(spec, files, allowed)
        if not calibration:
            raise JobInputError("the calibration data is empty: no batch to calibrate on")
        # factory models are built here only: the API could not check this
        check_fits(model, calibration[0], "the calibration data does not fit the model: its first batch")
        evaluate = _evaluation(spec, files, allowed, model, calibration)
    except QuanttuneError:
        raise
    except Exception as exc:  # the user's factory / data raised: the job fails with the reason
        raise JobInputError(f"preparing the job failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    return Inputs(model, calibration, evaluate)


def _model(spec: JobSpec, files: Files, allowed: Allowed, workdir: Path) -> nn.Module:
    if "model_file" in files:
        from tuner.pt2_archive import load_exported

        path = workdir / "model.pt2"
        path.write_bytes(files["model_file"][1])
        model = load_exported(path)
    else:
        model = resolve(spec.model or "", allowed.modules, field="spec.model", code_dirs=allowed.code_dirs)()
        if "weights_file" in files:
            if not isinstance(model, nn.Module):
                raise JobInputError(f"spec.model {spec.model!r} returned {type(model).__name__}, not an nn.Module")
            model.load_state_dict(read_tensors(files["weights_file"][1], field="weights_file"))
    if not isinstance(model, nn.Module):
        raise JobInputError(f"the model is a {type(model).__name__}, not a torch nn.Module")
    model.eval()
    return model


def _dataset(files: Files, role: str, batch_size: int, *, need_label: bool = False) -> tuple[dict, list[Any]]:
    tensors = read_tensors(files[role][1], field=role)
    check_dataset(tensors, field=role, need_label=need_label)
    return tensors, to_batches(tensors, batch_size)


def _calibration(spec: JobSpec, files: Files, allowed: Allowed) -> list[Any]:
    if "calibration_file" in files:
        return _dataset(files, "calibration_file", spec.batch_size)[1]
    return list(resolve(spec.calibration or "", allowed.modules, field="spec.calibration", code_dirs=allowed.code_dirs)())


def _evaluation(spec: JobSpec, files: Files, allowed: Allowed, model: nn.Module,
                calibration: list[Any]) -> Callable[[nn.Module], float]:
    if spec.evaluate:
        return resolve(spec.evaluate, allowed.modules, field="spec.evaluate", code_dirs=allowed.code_dirs)
    if spec.evaluator == "top1":
        tensors, batches = _dataset(files, "eval_file", spec.batch_size, need_label=True)
        return evaluators.top1(batches, labels(tensors, spec.batch_size))
    # agreement with the FP32 model, on eval_file inputs or the calibration data
    batches = _dataset(files, "eval_file", spec.batch_size)[1] if "eval_file" in files else calibration
    return evaluators.agreement(copy.deepcopy(model), batches)
