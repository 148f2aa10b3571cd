"""How a model's inputs and outputs map onto an ONNX graph's flat lists of tensors, and back.

An ONNX graph takes and returns flat, named tensors; a PyTorch model takes a tensor, positional
inputs or keyword inputs and may return a tensor, a tuple, a dict or a dataclass (a Hugging Face
`ModelOutput`). `InputSpec` and the output tree record the structure at export time (as JSON in
the file's metadata) so that `load_onnx` can be called, and answers, like the original model.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batches import call_model
from .errors import InvalidArgumentError

_CONSTANTS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class InputSpec:
    """How a batch maps onto the graph inputs.

    `kind` is "tensor" (model(x)), "positional" (model(*batch)) or "keyword" (model(**batch)).
    `names` lists every argument in call order; `tensors` the ones that are graph inputs (same
    names); `constants` the other arguments' values, fixed at export time (e.g. None).
    """

    kind: str
    names: tuple[str, ...]
    tensors: tuple[str, ...]
    constants: Mapping[str, Any]

    @classmethod
    def from_batch(cls, model: torch.nn.Module, batch: Any) -> InputSpec:
        if isinstance(batch, torch.Tensor):
            return cls("tensor", (_positional_names(model, 1)[0],), (_positional_names(model, 1)[0],), {})
        if isinstance(batch, Mapping):
            kind, items = "keyword", [(str(k), v) for k, v in batch.items()]
        elif isinstance(batch, (tuple, list)):
            kind, items = "positional", list(zip(_positional_names(model, len(batch)), batch))
        else:
            raise InvalidArgumentError(
                f"a batch must be a tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
                f"but got {type(batch).__name__}."
            )
        constants = {}
        for name, value in items:
            if not isinstance(value, torch.Tensor):
                if not isinstance(value, _CONSTANTS):
                    raise InvalidArgumentError(
                        f"input {name!r} must be a tensor or a constant (None, bool, int, float, str) to be "
                        f"exported, but got {type(value).__name__}."
                    )
                constants[name] = value
        names = tuple(name for name, _ in items)
        return cls(kind, names, tuple(n for n in names if n not in constants), constants)

    def tensors_of(self, batch: Any) -> list[torch.Tensor]:
        """The graph-input tensors of a batch shaped like the example, in graph order."""
        if self.kind == "tensor":
            return [batch]
        values = dict(batch) if self.kind == "keyword" else dict(zip(self.names, batch))
        return [values[name] for name in self.tensors]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Any:
        """The batch the model is called with, from the graph-input tensors."""
        values = {**self.constants, **dict(zip(self.tensors, tensors))}
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "keyword":
            return {name: values[name] for name in self.names}
        return tuple(values[name] for name in self.names)

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
        """The graph-input values of a call `model(*args, **kwargs)`, like Python binds arguments:
        positional arguments fill `names` in order, keywords by name."""
        if len(args) > len(self.names):
            raise InvalidArgumentError(
                f"the exported model takes at most {len(self.names)} positional inputs {list(self.names)}, "
                f"but got {len(args)}."
            )
        values = dict(zip(self.names, args))
        for name, value in kwargs.items():
            if name not in self.names:
                raise InvalidArgumentError(
                    f"the exported model's inputs are {list(self.names)}, but got an unexpected keyword {name!r}: "
                    f"the graph has only the inputs of the example batch it was exported with; export with an "
                    f"example that has {name!r} to use it."
                )
            if name in values:
                raise InvalidArgumentError(f"input {name!r} was given both by position and by keyword.")
            values[name] = value
        missing = [n for n in self.tensors if n not in values]
        if missing:
            raise InvalidArgumentError(
                f"the exported model needs the inputs {list(self.tensors)}, but {missing} are missing."
            )
        return [values[name] for name in self.tensors]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "tensors": list(self.tensors),
                "constants": dict(self.constants)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        return cls(data["kind"], tuple(data["names"]), tuple(data["tensors"]), dict(data["constants"]))


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    """Names of the first `count` positional parameters of `model.forward` (input_i where unknown)."""
    names: list[str] = []
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    names = names[:count]
    names += [f"input_{i}" for i in range(len(names), count)]
    return names


# -- outputs ---------------------------------------------------------------------------------


def flatten_output(output: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Every tensor of a model output, in order, and the JSON tree that rebuilds the output."""
    tensors: list[torch.Tensor] = []

    def walk(value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return {"t": "tensor", "index": len(tensors) - 1}
        if isinstance(value, Mapping):  # dicts and Hugging Face ModelOutputs (their non-None fields)
            keys = [str(k) for k in value]
            return {"t": "dict", "cls": _class_name(value, dict), "keys": keys, "items": [walk(value[k]) for k in value]}
        if isinstance(value, (tuple, list)):
            cls = _class_name(value, type(value)) if hasattr(value, "_fields") else None  # namedtuple
            kind = type(value).__name__ if cls is None else "namedtuple"
            return {"t": kind, "cls": cls, "items": [walk(v) for v in value]}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = [f.name for f in dataclasses.fields(value)]
            return {"t": "dataclass", "cls": _class_name(value, None), "keys": fields,
                    "items": [walk(getattr(value, f)) for f in fields]}
        if isinstance(value, _CONSTANTS):
            return {"t": "const", "value": value}
        raise InvalidArgumentError(
            f"model outputs must be tensors or tuples/lists/dicts/dataclasses of tensors to be exported, "
            f"but got a {type(value).__name__}."
        )

    return tensors, walk(output)


def rebuild_output(tree: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> Any:
    """The output structure recorded by `flatten_output`, filled with `tensors`.

    Classes (ModelOutput, namedtuple, dataclass) are rebuilt only from modules already imported
    by the caller (nothing is imported on behalf of a file); otherwise a dict or tuple stands in.
    """
    kind = tree["t"]
    if kind == "tensor":
        return tensors[tree["index"]]
    if kind == "const":
        return tree["value"]
    items = [rebuild_output(item, tensors) for item in tree["items"]]
    cls = _find_class(tree.get("cls"))
    if kind in ("dict", "dataclass"):
        values = dict(zip(tree["keys"], items))
        if cls is not None:
            try:
                return cls(**values)
            except TypeError:
                pass
        return values
    if kind == "namedtuple" and cls is not None:
        return cls(*items)
    return list(items) if kind == "list" else tuple(items)


def _class_name(value: Any, plain: type | None) -> str | None:
    cls = type(value)
    if cls is plain:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def _find_class(name: str | None) -> type | None:
    if not name:
        return None
    module_name, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


class FlatModel(torch.nn.Module):
    """The model with flat tensor inputs and a flat tuple of tensor outputs, for the exporter."""

    def __init__(self, model: torch.nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_output(call_model(self.model, self.spec.rebuild(tensors)))[0])
