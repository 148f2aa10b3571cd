"""Tensors that no module returns: the result of a functional call (`torch.cat`, `x.view`,
`x.chunk`, ...) made directly in a module's own `forward`.

A Concat written as `torch.cat(...)` in a block's forward, or a channel shuffle's view/transpose,
must be quantized too for ONNX Runtime to run QLinearConcat and move uint8 data. Such a tensor is
named `<module>/<function>` (`stage2.1/cat`), or `<module>/<function>_<k>` for the k-th call of that
function in one call of the module (`stage2.1/view_2`); `tuner.graph` reads these names from the
torch.export graph (each node's `torch_fn` and `nn_module_stack`), and `hook_functional` finds the
same calls in an eager (or torch.export-traced) forward with a `TorchFunctionMode` that is active
while the module runs. Only calls made by the module's own code count, not those of its submodules:
the same rule as `nn_module_stack`'s innermost module.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode


def site_name(module: str, function: str, occurrence: int) -> str:
    return f"{module}/{function}" + (f"_{occurrence}" if occurrence > 1 else "")


def function_name(torch_fn: tuple[str, str] | None) -> str | None:
    """`cat` for export's `torch_fn` metadata `('cat_2', 'builtin_function_or_method.cat')`."""
    return torch_fn[1].rsplit(".", 1)[-1] if torch_fn else None


class _CallsOf(TorchFunctionMode):
    """Counts the torch functions `owner`'s own code calls and passes chosen results to callbacks."""

    def __init__(self, owner: nn.Module, callbacks: dict[tuple[str, int], Callable[[Any], Any]]):
        super().__init__()
        self.owner, self.callbacks = owner, callbacks
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", None)
        if name is None or not self._called_by_owner():
            return out
        self.counts[name] += 1
        callback = self.callbacks.get((name, self.counts[name]))
        return out if callback is None else callback(out)

    def _called_by_owner(self) -> bool:
        """Whether the innermost module on the Python call stack is the owner (not a submodule)."""
        frame = sys._getframe(2)
        while frame is not None:
            this = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if isinstance(this, nn.Module):
                return this is self.owner
            frame = frame.f_back
        return False


def hook_functional(model: nn.Module, sites: dict[str, tuple[str, str, int]],
                    callbacks: dict[str, Callable[[Any], Any]]) -> list[Any]:
    """Call `callbacks[site](result)` on each functional site's result (its return value replaces
    the result); `sites`: site -> (module, function, occurrence) from `ModelGraph.functional`.
    Returns the hook handles."""
    by_module: dict[str, dict[tuple[str, int], Callable[[Any], Any]]] = defaultdict(dict)
    for site, callback in callbacks.items():
        module, function, occurrence = sites[site]
        by_module[module][(function, occurrence)] = callback
    handles = []
    for path, chosen in by_module.items():
        owner = model.get_submodule(path)
        hook = _ModeHook(chosen)
        handles.append(owner.register_forward_pre_hook(hook.enter))
        handles.append(owner.register_forward_hook(hook.leave, always_call=True))
    return handles


class _ModeHook:
    """Enters a `_CallsOf` mode while its module runs. An object, not a closure, so that a deep copy
    of the model gets its own (the owner is the module the hook is called for)."""

    def __init__(self, callbacks: dict[tuple[str, int], Callable[[Any], Any]]):
        self.callbacks = callbacks
        self.active: list[_CallsOf] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        mode = _CallsOf(module, self.callbacks)
        mode.__enter__()
        self.active.append(mode)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active:
            self.active.pop().__exit__(None, None, None)
