"""Tensor files sent by users, read without ever unpickling anything arbitrary, and the naming
convention that turns them into batches.

Accepted: safetensors, or a zip-format `.pt` read with `torch.load(weights_only=True)` (torch's
restricted unpickler: tensors and containers only). Anything else is refused.

Convention (one file = whole dataset, first dimension = samples, split into `batch_size`):
`input` -> model(x); `input.0`, `input.1`, ... -> model(x0, x1, ...); any other name -> keyword
argument; `label` -> the target of the `top1` evaluator (never passed to the model).
"""

from __future__ import annotations

import io
import json
import re
import struct
from typing import Any

import torch

from .errors import JobInputError

LABEL = "label"
_POSITIONAL = re.compile(r"^input\.(\d+)$")
_ZIP_MAGIC = b"PK\x03\x04"


def sniff(data: bytes) -> str | None:
    """'safetensors', 'zip' or None."""
    if data[:4] == _ZIP_MAGIC:
        return "zip"
    if len(data) >= 10:
        (length,) = struct.unpack("<Q", data[:8])
        if 2 <= length <= len(data) - 8 and data[8:9] == b"{":
            return "safetensors"
    return None


def read_tensors(data: bytes, *, field: str) -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` dict from a safetensors or weights-only `.pt` file."""
    kind = sniff(data)
    try:
        if kind == "safetensors":
            from safetensors.torch import load

            tensors = load(data)
        elif kind == "zip":
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            raise JobInputError(f"{field}: not a safetensors file nor a zip-format .pt file.", field=field)
    except JobInputError:
        raise
    except (Exception, json.JSONDecodeError) as exc:  # corrupt, truncated, or refused by weights_only
        raise JobInputError(f"{field}: unreadable tensor file ({kind}): {_short(exc)}", field=field) from None
    if not isinstance(tensors, dict) or not tensors:
        raise JobInputError(f"{field}: expected a non-empty mapping of names to tensors, got {type(tensors).__name__}.", field=field)
    bad = [str(k) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise JobInputError(f"{field}: every entry must be a tensor under a string name; not: {', '.join(bad[:5])}.", field=field)
    return dict(tensors)


def check_dataset(tensors: dict[str, torch.Tensor], *, field: str, need_label: bool = False) -> int:
    """Check the naming convention; returns the number of samples."""
    inputs = {k: v for k, v in tensors.items() if k != LABEL}
    if not inputs:
        raise JobInputError(f"{field}: no input tensor (name it 'input', 'input.0', ... or by keyword).", field=field)
    if "input" in inputs and any(_POSITIONAL.match(k) for k in inputs):
        raise JobInputError(f"{field}: use either 'input' or 'input.0', 'input.1', ..., not both.", field=field)
    positions = sorted(int(m.group(1)) for k in inputs if (m := _POSITIONAL.match(k)))
    if positions != list(range(len(positions))):
        raise JobInputError(f"{field}: positional inputs must be input.0 .. input.N without gaps, got {positions}.", field=field)
    keywords = [k for k in inputs if k != "input" and not _POSITIONAL.match(k)]
    if keywords and len(keywords) != len(inputs):
        raise JobInputError(f"{field}: inputs are either positional ('input' / 'input.N') or all by keyword, not mixed.", field=field)
    for name in inputs:
        if not (name == "input" or _POSITIONAL.match(name) or name.isidentifier()):
            raise JobInputError(f"{field}: tensor name {name!r} is not 'input', 'input.N' nor a keyword name.", field=field)
    if need_label and LABEL not in tensors:
        raise JobInputError(f"{field}: the top1 evaluator needs a '{LABEL}' tensor of class indices.", field=field)
    sizes = {name: (t.shape[0] if t.dim() else None) for name, t in tensors.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise JobInputError(f"{field}: every tensor needs the same first (sample) dimension, got {sizes}.", field=field)
    count = next(iter(sizes.values()))
    if count == 0:
        raise JobInputError(f"{field}: the dataset is empty.", field=field)
    if LABEL in tensors and (tensors[LABEL].dim() != 1 or tensors[LABEL].is_floating_point()):
        raise JobInputError(f"{field}: '{LABEL}' must be a 1-D integer tensor.", field=field)
    return count


def to_batches(tensors: dict[str, torch.Tensor], batch_size: int) -> list[Any]:
    """Split a dataset into model batches following the convention (labels left out)."""
    count = next(iter(tensors.values())).shape[0]
    positional = sorted(((int(m.group(1)), k) for k in tensors if (m := _POSITIONAL.match(k))))
    keywords = [k for k in tensors if k not in ("input", LABEL) and not _POSITIONAL.match(k)]
    batches: list[Any] = []
    for start in range(0, count, batch_size):
        part = slice(start, start + batch_size)
        args = [tensors["input"][part]] if "input" in tensors else [tensors[k][part] for _, k in positional]
        if keywords:
            batches.append({k: tensors[k][part] for k in keywords})
        else:
            batches.append(args[0] if len(args) == 1 else tuple(args))
    return batches


def describe_batch(batch: Any) -> str:
    """`input: float32[1, 1, 8, 8]`-style summary of a batch, for error messages."""

    def one(t: Any) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

    if isinstance(batch, dict):
        return ", ".join(f"{k}: {one(v)}" for k, v in batch.items())
    if isinstance(batch, tuple):
        return ", ".join(f"input.{i}: {one(v)}" for i, v in enumerate(batch))
    return f"input: {one(batch)}"


def labels(tensors: dict[str, torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    label = tensors[LABEL]
    return [label[i : i + batch_size] for i in range(0, label.shape[0], batch_size)]


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]
