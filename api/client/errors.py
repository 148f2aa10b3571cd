"""The SDK's exceptions: one base class, one subclass per HTTP status family, and the outcomes
of `Job.wait`. Each API error carries the server's `code`, `message` and `field` (the one error
shape of docs/api.md), so `str(error)` is what the server said.

    QuanttuneClientError
    ├── APIError                  a non-2xx response: status, code, message, field
    │   ├── BadRequestError       400
    │   ├── AuthenticationError   401 (no token, unknown token)
    │   ├── NotFoundError         404 (unknown job, another token's job, unknown artifact)
    │   ├── ConflictError         409 (cancel of a finished job; report/artifact not ready)
    │   ├── PayloadTooLargeError  413
    │   ├── InvalidInputError     422 (bad spec or upload, disallowed reference; also raised
    │   │                              before sending when the spec is invalid locally)
    │   └── ServerError           5xx
    ├── ClientArgumentError      a local argument the SDK cannot send (also a ValueError)
    ├── NetworkError              the server could not be reached / answered in time (after retries)
    ├── JobError                  `Job.wait`: the job gave no model within its budget (`.job` is its JobPublic)
    │   ├── JobFailedError
    │   ├── JobCancelledError
    │   └── BudgetNotMetError     only with `Job.wait(raise_on_miss=True)`: it succeeded, but missed the budget
    └── WaitTimeoutError          `Job.wait(timeout=...)` ran out (also a builtin TimeoutError)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from ..schemas import JobPublic


class QuanttuneClientError(Exception):
    """Base class of every error the quanttune SDK raises."""


class APIError(QuanttuneClientError):
    """The server answered with an error status (see docs/api.md, "Errors")."""

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 field: str | None = None, method: str | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.method = method
        self.url = url
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r}, field={self.field!r})"


class BadRequestError(APIError):
    status = 400


class AuthenticationError(APIError):
    status = 401


class NotFoundError(APIError):
    status = 404


class ConflictError(APIError):
    status = 409


class PayloadTooLargeError(APIError):
    status = 413


class InvalidInputError(APIError):
    status = 422


class ServerError(APIError):
    status = 500


class ClientArgumentError(QuanttuneClientError, ValueError):
    """An argument the SDK cannot turn into a request (wrong type, missing file), found before sending."""


class NetworkError(QuanttuneClientError):
    """The request did not get an answer: connection refused, DNS, timeout (after the retries)."""


class JobError(QuanttuneClientError):
    """A job ended without a model within its budget; `job` is its last `JobPublic`."""

    def __init__(self, message: str, job: JobPublic) -> None:
        super().__init__(message)
        self.job = job


class JobFailedError(JobError):
    """The job failed; the message is the server's `job.error`."""


class JobCancelledError(JobError):
    """The job was cancelled."""


class BudgetNotMetError(JobError):
    """The job succeeded (its report and artifacts can be read), but its `outcome` is 'not_met': no
    plan met the accuracy budget, or the exported model misses it on ONNX Runtime. Raised by
    `Job.wait(raise_on_miss=True)`; the CLI exits 4."""


class WaitTimeoutError(QuanttuneClientError, TimeoutError):
    """`Job.wait(timeout=...)` returned before the job finished."""


_BY_STATUS: dict[int, type[APIError]] = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError,
                                         409: ConflictError, 413: PayloadTooLargeError, 422: InvalidInputError}


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for a non-2xx response, carrying the server's code, message and field."""
    status = response.status_code
    code = field = None
    message = ""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        from ..schemas import ErrorInfo

        try:
            info = ErrorInfo.model_validate(body["error"])
            code, message, field = info.code, info.message, info.field
        except ValueError:
            pass
    if not message:
        text = response.text.strip() if response.content else ""
        message = text[:500] or response.reason_phrase or f"HTTP {status}"
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    try:
        request = response.request
    except RuntimeError:  # a response built by hand, without a request
        request = None
    return cls(message, status=status, code=code, field=field,
               method=request.method if request is not None else None,
               url=str(request.url) if request is not None else None)
