"""`create_app(settings)`: the FastAPI application, routes closed over injected dependencies."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.db import make_engine, make_sessionmaker
from worker.settings import Settings, get_settings
from worker.studies import Studies

from . import __version__
from .auth import bearer_source
from .dashboard import install_dashboard
from .docs import install_docs
from .errors import error_response, install_error_handlers
from .routes import artifacts, health, jobs, trials
from .threads import default_threads, set_request_threads

log = logging.getLogger("quanttune.api")


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413: at once when Content-Length says so,
    else while the body streams in (the error then surfaces inside the route as a 413)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    too_large = int(value) > self.limit
                except ValueError:
                    too_large = False
                if too_large:
                    response = error_response(413, "payload_too_large", self._message())
                    return await response(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # an HTTPException: FastAPI's body parsing passes it through
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body over the limit of {self.limit} bytes (QUANTTUNE_MAX_UPLOAD_BYTES)."


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """Build the app. The database schema must exist (`quanttune migrate`)."""
    settings = settings or get_settings(**overrides)
    engine = make_engine(settings.db_url)
    studies = Studies(settings.db_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        set_request_threads(settings.api_threads or default_threads(settings.db_url))
        yield
        studies.close()
        engine.dispose()

    app = FastAPI(title="quanttune", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Accuracy-aware INT8 quantization tuning as a service. See docs/api.md.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.studies = studies
    app.state.auth_sources = [bearer_source]  # the dashboard appends its cookie source

    install_error_handlers(app)
    v1 = APIRouter(prefix="/v1")
    for module in (health, jobs, trials, artifacts):
        v1.include_router(module.router)
    app.include_router(v1)
    install_dashboard(app)  # /dashboard/ pages + its cookie session as a second auth source
    install_docs(app)  # /docs: Swagger UI served from an installed package (no CDN), JobCreate in the spec
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    return app
