"""References `package.module:callable` to user code, resolved only inside the module prefixes
the operator allows (`--allow` of `quanttune serve | worker`, `QUANTTUNE_ALLOWED_MODULES`) and
imported from the user's code directories (`--code`, `QUANTTUNE_CODE_DIRS`) put on the import path.

The import caches are invalidated before each import: a new module under an allowed package,
copied into a code directory while the service runs, resolves without a restart (a module already
imported keeps the code it was imported with until its process restarts)."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import DisallowedReferenceError

REFERENCE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_allowed(module: str, allowed: Sequence[str]) -> bool:
    """`a.b` allows `a.b` and `a.b.c`, never `a.bc`."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in allowed)


ALLOW_HINT = "`--allow {top}` (quanttune serve / quanttune worker) or QUANTTUNE_ALLOWED_MODULES"
CODE_HINT = "`--code DIR` (quanttune serve / quanttune worker) or QUANTTUNE_CODE_DIRS"


def add_to_import_path(code_dirs: Sequence[Path | str]) -> None:
    """Put the directories `code_dirs` first on `sys.path` (each once), as PYTHONPATH would."""
    for directory in reversed([str(d) for d in code_dirs]):
        if directory not in sys.path:
            sys.path.insert(0, directory)


def resolve(reference: str, allowed: Sequence[str], *, field: str,
            code_dirs: Sequence[Path | str] = ()) -> Callable[..., Any]:
    """Import and return the callable named by `reference` (with `code_dirs` on the import path),
    or raise `DisallowedReferenceError` naming the field, the reference and the setting to change."""
    if not REFERENCE_RE.match(reference):
        raise DisallowedReferenceError(f"{field}: {reference!r} is not a reference 'package.module:callable'.", field=field)
    module_name, _, attribute = reference.partition(":")
    top = module_name.partition(".")[0]
    if not is_allowed(module_name, allowed):
        raise DisallowedReferenceError(
            f"{field}: module {module_name!r} of {reference!r} is not allowed; allowed module prefixes: "
            f"{', '.join(allowed) or '(none)'}. To allow it, start the server and its workers with "
            f"{ALLOW_HINT.format(top=top)}.", field=field)
    target: Any = _import(module_name, reference, field, code_dirs)
    for part in attribute.split("."):
        if part.startswith("_") or not hasattr(target, part):
            raise DisallowedReferenceError(f"{field}: {reference!r} not found: {module_name!r} has no attribute {attribute!r}.", field=field)
        target = getattr(target, part)
        if inspect.ismodule(target):  # `allowed.module:np.load` must not reach outside the allowed modules
            raise DisallowedReferenceError(f"{field}: {reference!r} goes through module {target.__name__!r}; name the "
                                      "module before the colon.", field=field)
    defined_in = getattr(target, "__module__", None)
    if isinstance(defined_in, str) and not is_allowed(defined_in, allowed):
        raise DisallowedReferenceError(
            f"{field}: {reference!r} is defined in module {defined_in!r}, outside the allowed prefixes "
            f"{', '.join(allowed)}; name it where it is defined, or allow that module with "
            f"{ALLOW_HINT.format(top=defined_in.partition('.')[0])}.", field=field)
    if not callable(target):
        raise DisallowedReferenceError(f"{field}: {reference!r} is not callable.", field=field)
    return target


def _import(module_name: str, reference: str, field: str, code_dirs: Sequence[Path | str]) -> Any:
    add_to_import_path(code_dirs)
    importlib.invalidate_caches()  # modules copied into a code dir since the last import
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise DisallowedReferenceError(f"{field}: importing module {module_name!r} of {reference!r} failed: {exc}; "
                                           "install what it imports where the server and its workers run.",
                                           field=field) from None
        where = ", ".join(map(str, code_dirs)) or "(none)"
        raise DisallowedReferenceError(
            f"{field}: cannot import module {module_name!r} of {reference!r}: {exc}. Put the directory that holds "
            f"{module_name.partition('.')[0]!r} on the import path of the server and its workers with {CODE_HINT} "
            f"(code dirs now: {where}).", field=field) from None
    except Exception as exc:  # the user's module raised while being imported
        raise DisallowedReferenceError(f"{field}: importing module {module_name!r} of {reference!r} raised "
                                       f"{type(exc).__name__}: {str(exc)[:500]}.", field=field) from None
