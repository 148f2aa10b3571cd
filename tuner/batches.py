"""How quanttune calls a user's model: batches in, tensors out, whatever their shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .errors import CalibrationError


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """Call `model` on one batch: a tensor, a tuple/list of positional inputs, or a dict of
    keyword inputs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a model output (tensor, tuple, list, dict or dataclass such
    as a Hugging Face ModelOutput), in a stable order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for key in output for t in output_tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    if dataclasses.is_dataclass(output):
        return [t for f in dataclasses.fields(output) for t in output_tensors(getattr(output, f.name))]
    return []


def as_batches(calibration: Any) -> list[Any]:
    """Materialise the calibration iterable once (it is run more than once: calibration, the
    error report), rejecting what cannot be a batch with a clear message."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise CalibrationError(
            "`calibration` must be an iterable of batches (e.g. a list of tensors or a DataLoader), "
            f"but got a single {type(calibration).__name__}; wrap it in a list: [batch]."
        )
    if not isinstance(calibration, Iterable):
        raise CalibrationError(f"`calibration` must be an iterable of batches, but got {type(calibration).__name__}.")
    batches = list(calibration)
    if not batches:
        raise CalibrationError("`calibration` is empty: at least one batch is needed to calibrate ranges.")
    return batches


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a batch (1 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim():
            return item.shape[0]
    return 1


def first_samples(batch: Any, n: int) -> Any:
    """The first `n` samples of a batch (a tensor, a tuple/list of positional inputs or a dict of
    keyword inputs): every tensor whose leading dimension is the batch size is sliced."""
    size = batch_size(batch)

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size:
            return value[:n]
        return value

    if isinstance(batch, Mapping):
        return {k: take(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(v) for v in batch)
    return take(batch)
