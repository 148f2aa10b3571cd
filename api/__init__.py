"""quanttune's service side: the REST API (`create_app`), its settings, schemas and the CLI."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quanttune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


def create_app(*args, **kwargs):  # noqa: ANN001, ANN201  (lazy: importing `api` stays cheap)
    from .app import create_app as factory

    return factory(*args, **kwargs)


__all__ = ["__version__", "create_app"]
