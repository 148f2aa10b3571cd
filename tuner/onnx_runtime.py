"""Run an exported model on ONNX Runtime as if it were the original PyTorch model.

    deployed = load_onnx("model.onnx", threads=1)
    evaluate(deployed)                       # the user's evaluation function, unchanged

`load_onnx` returns an `nn.Module` whose forward takes the original model's positional and keyword
inputs (torch tensors) and returns torch tensors in the original output structure (a tensor, a
tuple, a dict or a Hugging Face ModelOutput). `latency` times any such callable on one batch.

Evaluations written for PyTorch run on it unchanged: `next(model.parameters()).device` and
`.dtype` (a zero-size CPU float32 placeholder parameter and buffer), `model.device`,
`model.to(...)` / `.cpu()` / `.cuda()` / `.half()` (no-ops: ONNX Runtime runs on the CPU in the
file's own types), `.eval()` / `.train(False)`, and calls under `torch.no_grad()` or
`torch.inference_mode()`. Outputs come back on the device of the first input tensor.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .batches import call_model
from .errors import InvalidArgumentError, QuanttuneError
from .onnx_io import InputSpec, rebuild_output

METADATA_KEY = "quanttune"

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OnnxModule(nn.Module):
    """An ONNX Runtime session called like the exported PyTorch model (inference only)."""

    def __init__(self, session: Any, metadata: dict[str, Any], path: pathlib.Path):
        super().__init__()
        # what `next(model.parameters()).device` / `.dtype` and `model.buffers()` read: no weights
        self.placeholder = nn.Parameter(torch.empty(0), requires_grad=False)
        self.register_buffer("placeholder_buffer", torch.empty(0), persistent=False)
        self.session = session
        self.path = path
        self.metadata = metadata
        self.spec = InputSpec.from_dict(metadata["inputs"])
        self._tree = metadata["outputs"]
        self._outputs = metadata["output_names"]
        inputs = {i.name: i for i in session.get_inputs()}
        self._dtypes = [_NUMPY_TYPES.get(inputs[name].type) for name in self.spec.tensors]
        self.eval()

    @property
    def device(self) -> torch.device:
        """Where ONNX Runtime runs the model: the CPU."""
        return self.placeholder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placeholder.dtype

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> OnnxModule:
        """`.to()`, `.cpu()`, `.cuda()`, `.half()`, ... leave the session (and the placeholder) as they are."""
        return self

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Per layer of the plan: its precision and, for INT8 layers, its nodes and parameters."""
        return self.metadata["layers"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values = self.spec.bind(args, kwargs)
        feed = {}
        for name, value, dtype in zip(self.spec.tensors, values, self._dtypes):
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            feed[name] = np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))
        results = [torch.from_numpy(np.asarray(r)) for r in self.session.run(self._outputs, feed)]
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
        if device is not None and device.type != "cpu":  # where the evaluation keeps its labels
            results = [r.to(device) for r in results]
        return rebuild_output(self._tree, results)

    def extra_repr(self) -> str:
        return f"{self.path.name}, providers={self.session.get_providers()}"


def read_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """The quanttune metadata of an exported file (inputs, outputs, plan, layers)."""
    import onnx

    from .onnx_graph import unpack_layers
    from .plan import Plan

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            metadata = json.loads(prop.value)
            if metadata.get("format", 1) >= 2:  # layers stored without what the plan says
                metadata["layers"] = unpack_layers(metadata["layers"], Plan.from_dict(metadata["plan"]))
            return metadata
    raise QuanttuneError(f"{path} was not exported by quanttune: it has no {METADATA_KEY!r} metadata.")


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options: all graph optimizations (QDQ fusion into INT8 kernels),
    `threads` intra-op threads (ONNX Runtime's default when None), sequential execution."""
    import onnxruntime as ort

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"`threads` must be a positive integer or None, but got {threads=}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def load_onnx(path: str | pathlib.Path, *, threads: int | None = None) -> OnnxModule:
    """A module running the quanttune-exported ONNX file at `path` on ONNX Runtime's CPU provider,
    called like the original model; `threads` sets the intra-op thread count."""
    import onnxruntime as ort

    path = pathlib.Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"`path` must be an existing ONNX file, but got {str(path)!r}.")
    metadata = read_metadata(path)
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    return OnnxModule(session, metadata, path)


def latency(model: Callable[..., Any] | Mapping[str, Callable[..., Any]], batch: Any, *, runs: int = 20,
            warmup: int = 3) -> dict[str, Any]:
    """Wall-clock seconds of `model` on `batch` (called as `tuner.batches.call_model` does), without
    autograd: median, min and mean over `runs` timed calls after `warmup` untimed ones.

    Given a mapping of name -> model, the models are timed in turns (one call each per round), so
    that a busy machine slows them alike and their ratios stay meaningful; every other round runs
    them in reverse order, because the model called right after another starts with the other's
    data in the caches (measured: MobileNetV2's INT8 file timed right after the FP32 one read
    1.01-1.03x `quantize_static`'s speed, timed after static's 1.07-1.09x). Returns name -> timings.
    """
    if runs < 1 or warmup < 0:
        raise InvalidArgumentError(f"`runs >= 1` and `warmup >= 0` must hold, but got {runs=} and {warmup=}.")
    models = dict(model) if isinstance(model, Mapping) else {"model": model}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + runs):
            for name, m in (models.items() if i % 2 == 0 else reversed(models.items())):
                start = time.perf_counter()
                call_model(m, batch)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    stats = {
        name: {"median": statistics.median(t), "min": min(t), "mean": statistics.fmean(t), "runs": runs}
        for name, t in times.items()
    }
    return stats if isinstance(model, Mapping) else stats["model"]
