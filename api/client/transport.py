"""`Transport`: the SDK's one HTTP helper, shared by `Client` and every `Job` it makes: base URL,
token, timeouts, retries with exponential backoff, and the typed error of a non-2xx answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from .. import __version__
from .errors import NetworkError, error_from_response

RETRY_STATUSES = (502, 503, 504)


class Transport:
    """Requests to `<url>/v1`. `timeout`: seconds per request; `retries`: further attempts after a
    connection failure (and, for idempotent requests, a dropped connection or 502/503/504),
    `backoff` seconds apart, doubling each time."""

    def __init__(self, url: str, token: str | None, *, timeout: float, retries: int, backoff: float,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        headers = {"User-Agent": f"quanttune-sdk/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=f"{url}/v1", headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        self._http.close()

    def send(self, request: httpx.Request, *, idempotent: bool, stream: bool = False) -> httpx.Response:
        """Send with retries; a non-2xx answer raises its typed error with the server's message."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                # a request that never connected is safe to repeat; others only when idempotent
                if last or not (idempotent or isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))):
                    raise NetworkError(f"{request.method} {request.url} failed after {attempt + 1} attempt(s): "
                                       f"{type(exc).__name__}: {exc or 'no answer'}") from exc
            else:
                if not response.is_error:
                    return response
                if last or not idempotent or response.status_code not in RETRY_STATUSES:
                    if stream:
                        response.read()
                        response.close()
                    raise error_from_response(response)
                response.close()
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> httpx.Response:
        return self.send(self._http.build_request(method, path, **kwargs), idempotent=idempotent)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, idempotent=True, **kwargs)

    def upload_timeout(self) -> httpx.Timeout:
        """Uploads get at least 300 s."""
        return httpx.Timeout(max(self.timeout, 300.0), connect=min(self.timeout, 10.0))

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        response = self.send(self._http.build_request(method, path, **kwargs), idempotent=True, stream=True)
        try:
            yield response
        except httpx.TransportError as exc:
            raise NetworkError(f"{method} {response.url}: the download broke off: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()
