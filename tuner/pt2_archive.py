"""Models as `torch.export` archives (.pt2): export a user's nn.Module, load an uploaded archive.

    export_model(model, batch, "model.pt2")   # client side: the batch dimension (and a token
                                              # input's sequence dimension) is exported dynamic
    model = load_exported("model.pt2")        # server side: an nn.Module the tuner can quantize

`torch.export.load(path).module()` runs every Linear/Conv/Embedding as an `aten.linear`/
`aten.conv2d`/`aten.embedding` call on a parameter, so `quantizable_layers` finds nothing in it.
`load_exported` turns each such call back into a real `nn.Linear`/`nn.ConvNd`/`nn.Embedding`
submodule at the original qualified name (`encoder.layer.0.attention.self.query`), holding the
original parameters: calibration, plans and `apply_plan` then
work on it exactly as on the eager model, with the same layer names.

Safety: `load_exported` never hands torch a file that `pt2_check.check_archive` refuses; see there.
"""

from __future__ import annotations

import inspect
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import InvalidArchiveError, InvalidArgumentError
from .export_errors import check_batch, export_failure, torch_output
from .pt2_check import check_archive
from .pt2_layers import materialize_layers


# -- export (client side) ------------------------------------------------------------------------


def export_model(model: nn.Module, example_batch: Any, path: str | Path, *, dynamic_batch: bool = True) -> Path:
    """Export `model` with `torch.export` on one batch (a tensor, a tuple/list of positional inputs
    or a dict of keyword inputs) and save it to `path` (a `.pt2` file). The model is exported in
    eval mode (dropout off, batch-norm running statistics), which the archive then keeps.

    With `dynamic_batch` the leading dimension of every tensor input is dynamic, and so is the
    sequence dimension (dim 1) of integer token inputs such as `input_ids`/`attention_mask`. When
    the model does not export that way the next more static variant is tried (batch only, then fully
    static) and a warning says so: the archive then only accepts those exact shapes.

    The batch is first run eagerly: one that does not fit the model raises `BatchMismatchError`
    (the data is at fault). An export that fails raises `InvalidArgumentError` with one message (the
    cause, where in the model's code, what to do); torch's own output is captured, not printed.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"`model` must be a torch.nn.Module, but got {type(model).__name__}.")
    path = Path(path)
    if path.suffix != ".pt2":
        raise InvalidArgumentError(f"`path` must name a .pt2 file (torch.export's archive format), but got {str(path)!r}.")
    args, kwargs = _split_batch(example_batch)
    attempts: list[tuple[str, Any]] = []
    if dynamic_batch:
        with_seq, batch_only = _dynamic_shapes(args, kwargs, seq=True), _dynamic_shapes(args, kwargs, seq=False)
        if with_seq != batch_only:
            attempts.append(("batch and sequence dimensions dynamic", with_seq))
        attempts.append(("batch dimension dynamic", batch_only))
    attempts.append(("static shapes", None))

    was_training = model.training
    model.eval()
    failures: list[str] = []
    try:
        check_batch(model, args, kwargs, "the example batch")
        for how, shapes in attempts:
            # fresh tensor objects each time: export marks the ones it is given as dynamic
            fresh_args, fresh_kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
            try:
                with torch_output() as captured:
                    program = torch.export.export(model, fresh_args, fresh_kwargs, dynamic_shapes=shapes)
                break
            except Exception as error:  # torch raises many unrelated types here
                if shapes is None:
                    raise InvalidArgumentError(export_failure(error, model, captured.getvalue())) from None
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                failures.append(f"with {how}: {reason}")
    finally:
        model.train(was_training)
    if failures:
        hint = " (the example batch has batch size 1: export with 2 or more)" if _batch_of(args, kwargs) == 1 else ""
        warnings.warn(
            f"exported {str(path)!r} with {how} only{hint}; the archive accepts only those shapes. "
            f"torch.export failed {'; '.join(failures)}",
            UserWarning,
            stacklevel=2,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    return tensors[0].shape[0] if tensors else None


def _dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any], *, seq: bool) -> Any:
    """Per input: dim 0 dynamic; with `seq`, also dim 1 of integer token inputs (2-D int/bool
    [batch, seq], e.g. input_ids) and of every other input whose dim 1 has that length."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    tokens = {t.shape[1] for t in leaves if t.dim() == 2 and t.dtype in (torch.int64, torch.int32, torch.bool)}
    seq_len = next(iter(tokens)) if seq and len(tokens) == 1 else None

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: Dim.DYNAMIC}
        if seq_len is not None and x.dim() >= 2 and x.shape[1] == seq_len:
            dims[1] = Dim.DYNAMIC
        return dims

    if kwargs:
        return {name: pytree.tree_map(spec, value) for name, value in kwargs.items()}
    return tuple(pytree.tree_map(spec, value) for value in args)


# -- load (server side) --------------------------------------------------------------------------


def load_exported(path: str | Path) -> nn.Module:
    """Load a torch.export archive into a module that calls like the exported model (same
    positional/keyword inputs, same outputs) and in which every Linear/Conv/Embedding call on a
    parameter is a real `nn.Linear`/`nn.ConvNd`/`nn.Embedding` at its original qualified name. The file is checked before torch
    reads it (see `tuner.pt2_check`); what is refused raises `InvalidArchiveError`.

    `train()`/`eval()` only set flags: dropout and batch-norm behave as in the mode the model was
    exported in.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidArchiveError(f"cannot read the model archive {str(path)!r}: {error.strerror or error}") from None
    check_archive(data, str(path))
    try:
        program = torch.export.load(io.BytesIO(data))
        module = program.module(check_guards=False)
    except Exception as error:
        raise InvalidArchiveError(
            f"{str(path)!r} looks like a torch.export archive but torch could not load it "
            f"({type(error).__name__}: {str(error).strip()[:300]}); re-export it with this torch version ({torch.__version__})."
        ) from error
    for method in ("train", "eval"):  # ExportedProgram.module() makes both raise; flags are harmless
        module.__dict__.pop(method, None)
    module.register_forward_pre_hook(_as_exported, prepend=True, with_kwargs=True)
    skipped = materialize_layers(module)
    if skipped:
        warnings.warn(
            f"{len(skipped)} linear/convolution/embedding call(s) in {str(path)!r} stay FP32 and cannot be tuned: "
            + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
            UserWarning,
            stacklevel=2,
        )
    return module.eval()


def _as_exported(module: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Accept the inputs positionally or by keyword, as the eager model did: pass them on the way
    they were exported (torch's own input check insists on that)."""
    names = inspect.signature(module.forward).parameters
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except TypeError as error:
        raise InvalidArgumentError(f"the model takes ({', '.join(names)}): {error}") from None
    values = [bound[name] for name in names if name in bound]
    positional = module._in_spec.child(0).num_children
    return tuple(values[:positional]), dict(zip(list(names)[positional:], values[positional:]))
