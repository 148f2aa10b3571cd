"""What a search prepares once and shares: the FP32 baseline, the calibration statistics, the
per-layer error report and the sensitivity ranking.

With several workers on one study (or a resumed one) only the first computes each of them; the
others load what it stored. The sharing goes through a `SharedStore` (the service stores the
entries in its database next to the job; `MemoryStore` keeps them for one process):

- `load(name)` -> the stored bytes or None; `save(name, data)`;
- `claim(name)` -> True when the caller should compute `name` now (atomic across processes: one
  claimant at a time; a claim whose owner died is taken over; the owner may claim again), False
  while another computes it or once it is stored;
- `release(name)`: give a claim back without storing (the computation failed).

`once(store, name, compute)` is the protocol's one use: load, else claim and compute, else wait.

The calibration and report are stored as `torch.save` bytes of plain containers and tensors (no
pickled classes: `torch.load(weights_only=True)` reads them back), compressed with zlib: per
layer its input min/max, histogram counts (float64, exact) and per-channel min/max, its MACs and
shape; and its SQNR under each setting. Loading rebuilds the same objects, so every worker derives
the same ranges and plan keys. The calibration batches are not stored: each worker has them.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .calibrate import Calibration
from .errors import Stopped
from .report import LayerReport

FORMAT = 1
POLL_S = 0.2


class SharedStore(Protocol):
    def load(self, name: str) -> bytes | None: ...

    def save(self, name: str, data: bytes) -> None: ...

    def claim(self, name: str) -> bool: ...

    def release(self, name: str) -> None: ...


class MemoryStore:
    """Entries kept for the life of this object (one process; a claim belongs to the thread that
    took it, and taking it again is allowed)."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self._claimed: dict[str, int] = {}
        self._lock = threading.Lock()

    def load(self, name: str) -> bytes | None:
        return self.entries.get(name)

    def save(self, name: str, data: bytes) -> None:
        with self._lock:
            self.entries[name] = data
            self._claimed.pop(name, None)

    def claim(self, name: str) -> bool:
        with self._lock:
            if name in self.entries or self._claimed.setdefault(name, threading.get_ident()) != threading.get_ident():
                return False
            return True

    def release(self, name: str) -> None:
        with self._lock:
            if self._claimed.get(name) == threading.get_ident():
                del self._claimed[name]


def once(store: SharedStore, name: str, compute: Callable[[], bytes],
         should_stop: Callable[[], bool] = lambda: False) -> tuple[bytes, bool]:
    """The entry `name`: loaded, or computed here when nobody else is computing it, or waited for.
    Returns (bytes, whether this call computed them)."""
    while True:
        data = store.load(name)
        if data is not None:
            return data, False
        if store.claim(name):
            try:
                data = compute()
            except BaseException:
                store.release(name)
                raise
            store.save(name, data)
            return data, True
        if should_stop():
            raise Stopped(f"stopped while another worker prepared {name!r}")
        time.sleep(POLL_S)


# -- calibration + report <-> bytes -------------------------------------------------------------


def dump_prepared(calibration: Calibration, report: LayerReport) -> bytes:
    state = {
        "format": FORMAT,
        "calibration": {"layers": _encode(calibration.layers), "seconds": calibration.seconds,
                        "tensors": _encode(getattr(calibration, "tensors", None) or {}),
                        "smooth_folds": _encode(getattr(calibration, "smooth_folds", None) or {})},
        "report": {"layers": _encode(report.layers), "seconds": report.seconds},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return zlib.compress(buffer.getvalue(), 6)


def load_prepared(data: bytes, model: nn.Module, batches: list[Any]) -> tuple[Calibration, LayerReport]:
    state = torch.load(io.BytesIO(zlib.decompress(data)), weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"prepared state of format {state.get('format')!r}, expected {FORMAT}")
    stored = state["calibration"]
    calibration = _calibration(model, _decode(stored["layers"]), batches, stored["seconds"],
                               _decode(stored.get("tensors", {"__dict__": {}})),
                               _decode(stored.get("smooth_folds", {"__dict__": {}})))
    report = LayerReport(_decode(state["report"]["layers"]), calibration, state["report"]["seconds"])
    return calibration, report


def _calibration(model: nn.Module, layers: dict[str, Any], batches: list[Any], seconds: float,
                 tensors: dict[str, Any], smooth_folds: dict[str, str]) -> Calibration:
    """A `Calibration` from stored statistics. Where calibration also captures the model's graph
    and folds its BatchNorms (`Calibration(..., source=, graph=, tensors=)`), that structure is
    derived again here from the model (no data pass, no statistics): only statistics are stored."""
    import inspect

    if "graph" not in inspect.signature(Calibration).parameters:
        return Calibration(model, layers, batches, seconds)
    from .calibrate import quantizable_layers

    graphs = importlib.import_module("tuner.graph")
    was_training = model.training
    model.eval()
    try:
        graph = graphs.read_graph(model, batches[0], set(quantizable_layers(model)))
    finally:
        model.train(was_training)
    folded = graphs.fold_batchnorm(model, graph.folds) if graph is not None and graph.folds else model
    return Calibration(folded, layers, batches, seconds, source=model, graph=graph, tensors=tensors,
                       smooth_folds=smooth_folds)


def dump_ranking(ranking: list[str]) -> bytes:
    return json.dumps(ranking).encode()


def load_ranking(data: bytes) -> list[str]:
    return list(json.loads(data))


def _class_name(value: Any) -> str:
    cls = type(value)
    if not cls.__module__.startswith("tuner."):
        raise TypeError(f"cannot store a {cls.__module__}.{cls.__qualname__}")
    return f"{cls.__module__}:{cls.__qualname__}"


def _encode(value: Any) -> Any:
    """Plain containers, numbers, strings and tensors only; tuner objects become tagged dicts of
    their public attributes (private ones are caches, rebuilt empty)."""
    if value is None or isinstance(value, (bool, int, str, torch.Tensor)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, (list, tuple)):
        items = [_encode(v) for v in value]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("cannot store a dict with non-string keys")
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if dataclasses.is_dataclass(value):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": _class_name(value), "fields": fields}
    attrs = {k: _encode(v) for k, v in vars(value).items() if not k.startswith("_")}
    return {"__object__": _class_name(value), "attrs": attrs}


def _resolve(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith("tuner."):
        raise ValueError(f"refusing to rebuild {name!r}: not a tuner class")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not isinstance(cls, type):
        raise ValueError(f"{name!r} is not a class")
    return cls


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__float__" in value:
        return float(value["__float__"])
    if "__ndarray__" in value:
        return value["__ndarray__"].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if "__dataclass__" in value:
        return _resolve(value["__dataclass__"])(**{k: _decode(v) for k, v in value["fields"].items()})
    if "__object__" in value:
        obj = _resolve(value["__object__"])()  # its private caches start empty
        for key, item in value["attrs"].items():
            setattr(obj, key, _decode(item))
        return obj
    raise ValueError(f"unknown entry in prepared state: {sorted(value)[:3]}")
