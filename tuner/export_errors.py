"""torch.export failures said once: torch's own output captured, one message with the cause and
what to do.

    with torch_output() as captured:          # torch's loggers, warnings and stderr -> `captured`
        program = torch.export.export(model, args)
    ...
    raise InvalidArgumentError(export_failure(error, model, captured.getvalue()))

A failing `torch.export` logs pages of FX graphs and fake-tensor tracebacks to stderr before it
raises; a user needs the cause (data-dependent control flow, at which line of their code) and the
way out (`torch.cond`, or a factory reference the workers import instead of a traced model).
`check_batch` runs the model eagerly first, so that a batch of the wrong shape is blamed on the
data, not on the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import BatchMismatchError

COND_DOCS = "https://pytorch.org/docs/stable/generated/torch.cond.html"
EXPORT_DOCS = "https://pytorch.org/docs/stable/export.html"


@contextlib.contextmanager
def torch_output() -> Iterator[io.StringIO]:
    """Capture what torch logs (its loggers write to stderr through their own handlers), warns and
    prints to `sys.stderr` inside the block into the yielded buffer."""
    buffer = io.StringIO()
    swapped = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in ("torch", "onnxscript", "onnx_ir"):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler:
                    swapped.append((handler, handler.setStream(buffer)))
    try:
        with contextlib.redirect_stderr(buffer), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield buffer
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)
        for w in caught:
            buffer.write(f"{w.category.__name__}: {w.message}\n")


def check_batch(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> None:
    """Run `model` eagerly on one batch; `BatchMismatchError` naming `what` when it raises."""
    try:
        with torch.no_grad(), torch_output():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (the user's model on the user's data)
        raise BatchMismatchError(what, describe(args, kwargs), f"{type(exc).__name__}: {_first_line(exc)}") from None


def export_failure(error: BaseException, model: nn.Module, captured: str = "", *, factory_hint: bool = True) -> str:
    """One message for a failed `torch.export` of `model`: the cause, where in the user's code,
    what to do; torch's captured output is kept in a log file the message names."""
    name = type(model).__name__
    where = user_frame(error)
    at = f" at {where}" if where else ""
    factory = (" or submit the model as a factory reference 'package.module:build_model' that the workers import "
               "(then nothing is traced on your side)") if factory_hint else ""
    if data_dependent(error):
        message = (f"torch.export could not trace {name}: its forward takes a Python branch on the values of a tensor "
                   f"(control flow on data){at}. Write that branch with torch.cond ({COND_DOCS}){factory}.")
    else:
        message = (f"torch.export could not trace {name}{at}: {type(error).__name__}: {_first_line(error)}. Make the "
                   f"forward exportable ({EXPORT_DOCS}){factory}.")
    log = _keep_log(captured, error)
    return message + (f" torch's full output: {log}" if log else "")


def data_dependent(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return "datadependent" in text or "data-dependent" in text or "data dependent" in text


def user_frame(error: BaseException) -> str | None:
    """`file:line (code)` of the user's code torch names in its message, else the innermost
    traceback frame outside torch."""
    found = re.search(r'File "([^"]+)", line (\d+), in \w+\n\s+(.+)', str(error))
    if found:
        return f"{found.group(1)}:{found.group(2)} `{found.group(3).strip()}`"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/torch/" not in f.filename and "/tuner/" not in f.filename and "<" not in f.filename]
    if frames:
        frame = frames[-1]
        return f"{frame.filename}:{frame.lineno}" + (f" `{frame.line.strip()}`" if frame.line else "")
    return None


def describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """`input: float32[32, 5]`-style summary of a batch."""

    def one(t: Any) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

    parts = [f"input: {one(args[0])}"] if len(args) == 1 and not kwargs else [f"input.{i}: {one(v)}" for i, v in enumerate(args)]
    return ", ".join(parts + [f"{k}: {one(v)}" for k, v in kwargs.items()])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _keep_log(captured: str, error: BaseException) -> str | None:
    text = captured + "".join(traceback.format_exception(error))
    try:
        with tempfile.NamedTemporaryFile("w", prefix="quanttune-export-", suffix=".log", delete=False) as f:
            f.write(text)
        return f.name
    except OSError:
        return None
