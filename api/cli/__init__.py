"""The `quanttune` command line (`app`, `main`: the console script). One module per command
group, registered in `app.py`."""

from __future__ import annotations

from .app import app, main

__all__ = ["app", "main"]
