"""What `Client.submit` is given, turned into the parts of `POST /v1/jobs` (docs/api.md).

- a model: an `nn.Module` (exported with `tuner.export_model` into a `.pt2` upload), a path to a
  `.pt2` archive, or a factory reference `"module:callable"` (or the function itself, when it is
  importable by that name: `reference_of`);
- tensors (calibration, evaluation data, weights): never pickled; written as safetensors under the
  tensor-file convention (`input` / `input.0`, `input.1`, ... / keyword names / `label`, first
  dimension = samples), or an existing tensor file sent as it is.

torch is imported only when a tensor or module is actually given, so that the SDK stays light.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from worker.references import REFERENCE_RE

from .errors import ClientArgumentError

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
BUILTIN_EVALUATORS = ("top1", "agreement")
LABEL = "label"


def _torch() -> Any:
    return sys.modules.get("torch")  # a tensor or module can only exist once torch was imported


def is_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def is_module(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.nn.Module)


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and bool(REFERENCE_RE.match(value)) and not Path(value).exists()


def reference_of(value: Callable[..., Any], what: str) -> str:
    """`"module:qualname"` of a module-level function or class, as the workers will import it."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        raise ClientArgumentError(
            f"`{what}` must be a reference 'package.module:callable' importable on the workers (a function "
            f"defined in a script or inside another function cannot be sent), but got {value!r}.")
    return f"{module}:{qualname}"


def read_file(path: str | Path, what: str) -> tuple[str, bytes]:
    path = Path(path)
    if not path.is_file():
        hint = " (a reference is written 'package.module:callable')" if what in ("model", "calibration") else ""
        raise ClientArgumentError(f"`{what}` names no file: {str(path)!r} does not exist{hint}.")
    return path.name, path.read_bytes()


def as_path(value: Any) -> Path | None:
    """A path given for a file: a Path, or a string naming an existing file or a tensor/archive file."""
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and not is_reference(value):
        return Path(value)
    return None


# -- datasets ------------------------------------------------------------------------------------


def _batch_tensors(batch: Any, what: str) -> dict[str, Any]:
    """One batch (tensor, tuple/list of positional tensors, dict of keyword tensors) -> named tensors."""
    if is_tensor(batch):
        return {"input": batch}
    if isinstance(batch, Mapping):
        named = {str(k): v for k, v in batch.items()}
    elif isinstance(batch, (tuple, list)):
        named = {f"input.{i}": v for i, v in enumerate(batch)}
    else:
        raise ClientArgumentError(f"`{what}`: a batch must be a tensor, a tuple/list of tensors or a dict of "
                                   f"tensors, but got {type(batch).__name__}.")
    bad = [name for name, v in named.items() if not is_tensor(v)]
    if bad:
        raise ClientArgumentError(f"`{what}`: every input of a batch must be a tensor; not: {', '.join(bad[:5])}.")
    return named


def dataset(data: Any, what: str) -> tuple[dict[str, Any], int | None]:
    """Named tensors of a whole dataset, and the size of its first batch (None for one tensor/dict).

    `data`: a tensor (the single input, samples first), a dict of named tensors already in the
    convention, or an iterable of batches (concatenated along the first dimension)."""
    if is_tensor(data):
        return {"input": data}, None
    if isinstance(data, Mapping):
        named = _batch_tensors(data, what)
        return named, None
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ClientArgumentError(f"`{what}` must be a reference, a tensor file, a tensor, a dict of tensors or "
                                   f"batches, but got {type(data).__name__}.")
    torch = _torch()
    batches = [_batch_tensors(batch, what) for batch in data]
    if not batches:
        raise ClientArgumentError(f"`{what}` holds no batch.")
    names = list(batches[0])
    for i, batch in enumerate(batches):
        if list(batch) != names:
            raise ClientArgumentError(f"`{what}`: batch {i} has inputs {list(batch)}, batch 0 has {names}.")
    try:
        merged = {name: torch.cat([b[name].detach().cpu() for b in batches]) for name in names}
    except RuntimeError as exc:
        raise ClientArgumentError(f"`{what}`: the batches cannot be joined along the first dimension (pad them to "
                                   f"one shape, or give a reference to your data): {exc}") from None
    return merged, int(batches[0][names[0]].shape[0]) if batches[0][names[0]].dim() else None


def labels_tensor(labels: Any) -> Any:
    if is_tensor(labels):
        return labels.reshape(-1)
    torch = _torch()
    parts = list(labels) if isinstance(labels, Iterable) else []
    if torch is None or not parts or not all(is_tensor(p) for p in parts):
        raise ClientArgumentError(f"`labels` must be a tensor or a list of tensors of class indices, but got {type(labels).__name__}.")
    return torch.cat([p.reshape(-1) for p in parts])


def safetensors_bytes(named: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().cpu().contiguous().clone() for name, tensor in named.items()})


def first_batch(named: Mapping[str, Any], size: int) -> Any:
    """The first `size` samples as a model batch, following the convention (labels left out)."""
    inputs = {k: v[:size] for k, v in named.items() if k != LABEL}
    if "input" in inputs:
        return inputs["input"]
    positional = sorted((int(k.split(".", 1)[1]), v) for k, v in inputs.items() if k.startswith("input."))
    if positional and len(positional) == len(inputs):
        return tuple(v for _, v in positional)
    return inputs


def tensor_part(data: Any, what: str, *, labels: Any = None) -> tuple[tuple[str, bytes], dict[str, Any] | None, int | None]:
    """(upload part, named tensors when built here, first batch size) for a dataset that is not a reference."""
    path = as_path(data)
    if path is not None:
        if labels is not None:
            raise ClientArgumentError(f"`labels` go inside the tensor file given as `{what}` (a 'label' tensor).")
        return read_file(path, what), None, None
    named, batch = dataset(data, what)
    if labels is not None:
        named = {**named, LABEL: labels_tensor(labels)}
    return (f"{what}.safetensors", safetensors_bytes(named)), named, batch


def load_tensor_file(data: bytes) -> dict[str, Any]:
    """Tensors of a file given by path (to take an example batch from it), never unpickling."""
    import io

    if data[:4] == b"PK\x03\x04":
        import torch

        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    from safetensors.torch import load

    return load(data)


def weights_part(weights: Any) -> tuple[str, bytes]:
    path = as_path(weights)
    if path is not None:
        return read_file(path, "weights")
    if is_module(weights):
        weights = weights.state_dict()
    if not isinstance(weights, Mapping) or not all(is_tensor(v) for v in weights.values()):
        raise ClientArgumentError("`weights` must be a state dict of tensors, an nn.Module or a weights file, "
                                   f"but got {type(weights).__name__}.")
    return "weights.safetensors", safetensors_bytes(dict(weights))


def export_part(model: Any, example: Any, source: str = "example") -> tuple[str, bytes]:
    """The `.pt2` upload of an nn.Module, exported on `example` (one batch, taken from the
    `source` argument: "example" or "calibration", which a batch that does not fit is blamed on)."""
    from tuner import QuanttuneError
    from tuner.errors import BatchMismatchError
    from tuner.pt2_archive import export_model

    with tempfile.TemporaryDirectory(prefix="quanttune-export-") as tmp:
        try:
            path = export_model(model, example, Path(tmp) / "model.pt2")
        except BatchMismatchError as exc:
            batch = "the first calibration batch" if source == "calibration" else "the example batch"
            raise ClientArgumentError(
                f"`{source}`: the data does not fit the model: {batch} ({exc.batch}) raised {exc.cause}. Check the "
                f"{source} data's shape, dtype and input names (the model was not exported or sent).") from None
        except QuanttuneError as exc:
            raise ClientArgumentError(f"`model`: {exc}") from None
        return "model.pt2", path.read_bytes()
