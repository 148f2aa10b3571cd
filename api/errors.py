"""Service errors and the one place that maps every exception to an HTTP status and the one JSON
error shape (`api.schemas.ErrorBody`): the service's own errors carry their status; the library's
and the worker's plain errors get theirs from `STATUS`."""

from __future__ import annotations

import logging

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import tuner
from worker.errors import DisallowedReferenceError, JobInputError

log = logging.getLogger("quanttune.api")


class ServiceError(tuner.QuanttuneError):
    """An error of the service, carrying its HTTP status, code and offending field."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class InvalidToken(ServiceError):
    status, code = 401, "invalid_token"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class NotReady(ServiceError):
    status, code = 409, "not_ready"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


# The library's and the worker's errors (the most specific class that is listed wins).
STATUS: dict[type[Exception], tuple[int, str]] = {
    DisallowedReferenceError: (422, "disallowed_reference"),
    JobInputError: (422, "invalid_input"),
    tuner.InvalidArgumentError: (422, "invalid_input"),
    tuner.QuanttuneError: (400, "bad_request"),
}


def status_of(exc: tuner.QuanttuneError) -> tuple[int, str, str | None]:
    """HTTP status, code and offending field of one of quanttune's errors."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.code, exc.field
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return (*STATUS[cls], getattr(exc, "field", None))
    return 400, "bad_request", None


_HTTP_CODES = {400: "bad_request", 503: "unavailable", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
               422: "invalid_input", 429: "too_many_requests"}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status, headers=headers)


def _loc(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) if parts else "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(tuner.QuanttuneError)
    async def _quanttune(_request: Request, exc: tuner.QuanttuneError) -> JSONResponse:
        status, code, field = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, code, str(exc), field, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid input"}
        field = _loc(first.get("loc", ()))
        message = "; ".join(f"{_loc(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:5])
        return error_response(422, "invalid_input", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    async def _busy(request: Request, exc: Exception) -> JSONResponse:
        log.warning("busy: no database connection free for %s %s", request.method, request.url.path)
        return error_response(503, "unavailable", "the server is busy: no database connection was free in time; "
                              "retry shortly.", headers={"Retry-After": "2"})

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                    str(getattr(exc, "orig", exc)).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return error_response(503, "unavailable", "the database is unavailable (restarting?); retry shortly.",
                              headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error")
