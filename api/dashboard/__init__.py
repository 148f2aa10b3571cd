"""The web dashboard: jobs and trials pages under `/dashboard/`, same tokens and ownership as the
REST API (a login with an API token opens a signed cookie session)."""

from __future__ import annotations

from fastapi import FastAPI

from .pages import router
from .session import COOKIE, cookie_source

__all__ = ["COOKIE", "install_dashboard"]


def install_dashboard(app: FastAPI) -> None:
    """Serve the pages and accept the dashboard's cookie session on the JSON API too."""
    app.state.auth_sources.append(cookie_source)
    app.include_router(router)
