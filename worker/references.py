"""References `package.module:callable` to user code, resolved only inside the module prefixes
the operator allows (`QUANTTUNE_ALLOWED_MODULES`)."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from .errors import DisallowedReferenceError

REFERENCE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_allowed(module: str, allowed: Sequence[str]) -> bool:
    """`a.b` allows `a.b` and `a.b.c`, never `a.bc`."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in allowed)


def resolve(reference: str, allowed: Sequence[str], *, field: str) -> Callable[..., Any]:
    """Import and return the callable named by `reference`, or raise `DisallowedReferenceError`
    naming the field and the reference."""
    if not REFERENCE_RE.match(reference):
        raise DisallowedReferenceError(f"{field}: {reference!r} is not a reference 'package.module:callable'.", field=field)
    module_name, _, attribute = reference.partition(":")
    if not is_allowed(module_name, allowed):
        raise DisallowedReferenceError(
            f"{field}: module {module_name!r} of {reference!r} is not allowed; allowed module prefixes: "
            f"{', '.join(allowed) or '(none)'} (QUANTTUNE_ALLOWED_MODULES).",
            field=field,
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise DisallowedReferenceError(f"{field}: cannot import module {module_name!r} of {reference!r}: {exc}.", field=field) from None
    for part in attribute.split("."):
        if part.startswith("_") or not hasattr(target, part):
            raise DisallowedReferenceError(f"{field}: {reference!r} not found: {module_name!r} has no attribute {attribute!r}.", field=field)
        target = getattr(target, part)
        if inspect.ismodule(target):  # `allowed.module:np.load` must not reach outside the allowed modules
            raise DisallowedReferenceError(f"{field}: {reference!r} goes through module {target.__name__!r}; name the "
                                      "module before the colon.", field=field)
    defined_in = getattr(target, "__module__", None)
    if isinstance(defined_in, str) and not is_allowed(defined_in, allowed):
        raise DisallowedReferenceError(f"{field}: {reference!r} is defined in module {defined_in!r}, outside the allowed "
                                  f"prefixes {', '.join(allowed)} (QUANTTUNE_ALLOWED_MODULES).", field=field)
    if not callable(target):
        raise DisallowedReferenceError(f"{field}: {reference!r} is not callable.", field=field)
    return target
