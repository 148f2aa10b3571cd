"""The Python SDK of the quanttune service (REST contract: docs/api.md).

    from quanttune import Client

    client = Client("http://127.0.0.1:8000", token)          # or QUANTTUNE_URL / QUANTTUNE_TOKEN
    job = client.submit(model, calibration_batches, "tuner.examples.digits:evaluate", max_drop=0.01)
    job.wait()                                               # live progress bar; raises if it fails
    int8 = job.load_model()                                  # ONNX Runtime, called like `model`

Responses are the API's own pydantic models (`api.schemas`); errors are the typed exceptions of
`api.client_errors`, carrying the server's message. Requests time out after `timeout` seconds;
connection failures (and, for reads, dropped connections and 502/503/504) are retried `retries`
times with exponential backoff. torch is imported only when a model or tensors are given.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from . import __version__
from .client_errors import InvalidArgumentError, InvalidInputError, NetworkError, error_from_response
from .client_job import Job
from .client_upload import (
    BUILTIN_EVALUATORS,
    as_path,
    export_part,
    first_batch,
    is_module,
    is_reference,
    is_tensor,
    load_tensor_file,
    read_file,
    reference_of,
    tensor_part,
    weights_part,
)
from .schemas import HealthPublic, JobCreate, JobPublic, JobsPublic, JobStatus

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (502, 503, 504)


class Client:
    """A connection to a quanttune server.

    `url` defaults to `$QUANTTUNE_URL` (else http://127.0.0.1:8000) and `token` to
    `$QUANTTUNE_TOKEN`. `timeout`: seconds per request (uploads get at least 300). `retries`:
    further attempts after a connection failure, `backoff` seconds apart, doubling each time."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise InvalidArgumentError(f"`timeout > 0`, `retries >= 0` and `backoff >= 0` must hold, but got "
                                       f"{timeout=}, {retries=}, {backoff=}.")
        url = (url or os.environ.get("QUANTTUNE_URL") or DEFAULT_URL).rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        token = token if token is not None else os.environ.get("QUANTTUNE_TOKEN")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        headers = {"User-Agent": f"quanttune-sdk/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=f"{self.url}/v1", headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- HTTP ------------------------------------------------------------------------------------
    def _send(self, request: httpx.Request, *, idempotent: bool, stream: bool = False) -> httpx.Response:
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

    def _request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> httpx.Response:
        return self._send(self._http.build_request(method, path, **kwargs), idempotent=idempotent)

    def _get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._request("GET", path, idempotent=True, **kwargs)

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        response = self._send(self._http.build_request(method, path, **kwargs), idempotent=True, stream=True)
        try:
            yield response
        except httpx.TransportError as exc:
            raise NetworkError(f"{method} {response.url}: the download broke off: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()

    # -- jobs ------------------------------------------------------------------------------------
    def health(self) -> HealthPublic:
        """The server's health (needs no token)."""
        return HealthPublic.model_validate(self._get("/health").json())

    def jobs_page(self, status: JobStatus | None = None, *, offset: int = 0, limit: int = 50) -> JobsPublic:
        """One page of this token's jobs, newest first, with the total `count`."""
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if status is not None:
            params["status"] = status
        return JobsPublic.model_validate(self._get("/jobs", params=params).json())

    def jobs(self, status: JobStatus | None = None, *, offset: int = 0, limit: int = 50) -> list[Job]:
        """This token's jobs (newest first), optionally only those with `status`."""
        return [Job(self, info) for info in self.jobs_page(status, offset=offset, limit=limit).data]

    def job(self, job_id: int) -> Job:
        """The job with this id (`NotFoundError` if it does not exist or belongs to another token)."""
        return Job(self, JobPublic.model_validate(self._get(f"/jobs/{int(job_id)}").json()))

    def submit(
        self,
        model: Any,
        calibration: Any,
        evaluate: Any,
        *,
        example: Any = None,
        weights: Any = None,
        eval_data: Any = None,
        labels: Any = None,
        name: str | None = None,
        batch_size: int | None = None,
        max_drop: float = 0.01,
        relative: bool = True,
        higher_is_better: bool = True,
        max_trials: int | None = None,
        timeout: float | None = None,
        trial_timeout: float | None = None,
        space: dict[str, Any] | None = None,
        parallelism: int = 1,
        seed: int = 0,
    ) -> Job:
        """Submit a tuning job and return it (queued). Nothing is pickled.

        - `model`: an `nn.Module` (exported with `tuner.export_model` on `example`, default the
          first calibration batch, and uploaded), a path to a `.pt2` archive, or a factory
          reference `"module:callable"` (or that function) run on the workers, optionally with
          `weights` (a state dict, an `nn.Module` or a safetensors / weights-only `.pt` file).
        - `calibration`: batches (a list or any iterable of tensors, tuples or dicts), one tensor
          (samples first), a dict of named tensors, a tensor file, or a reference returning batches.
          Uploads are split back into batches of `batch_size` (default: the first batch's size).
        - `evaluate`: a reference `"module:function"` (or that function) taking the model and
          returning a float, or a built-in evaluator `"top1"` (with `eval_data` inputs and
          `labels`, or a file holding a `label` tensor) or `"agreement"` (top-1 agreement with the
          FP32 model on `eval_data`, or on the calibration data).
        - budget and limits as in `tuner.tune`: `max_drop`, `relative`, `higher_is_better`,
          `max_trials`, `timeout` (seconds), `space`, `seed`; `parallelism`: workers at once;
          `trial_timeout`: seconds one evaluation may take before its trial fails (the search goes on).

        References must be allowed by the server (`QUANTTUNE_ALLOWED_MODULES`), else
        `InvalidInputError` (422) with the server's message naming the field.
        """
        files: dict[str, tuple[str, bytes]] = {}
        spec: dict[str, Any] = {"max_drop": max_drop, "relative": relative, "higher_is_better": higher_is_better,
                                "max_trials": max_trials, "timeout": timeout, "trial_timeout": trial_timeout, "space": space,
                                "parallelism": parallelism, "seed": seed}
        self._evaluation(spec, files, evaluate, eval_data, labels)

        named: dict[str, Any] | None = None
        first: int | None = None
        if is_reference(calibration):
            spec["calibration"] = calibration
        elif callable(calibration) and not (is_module(calibration) or is_tensor(calibration)):
            spec["calibration"] = reference_of(calibration, "calibration")
        else:
            files["calibration_file"], named, first = tensor_part(calibration, "calibration")
        spec["batch_size"] = batch_size or first or 32

        if is_module(model):
            source = "example"
            if example is None and "calibration_file" in files:
                tensors = named if named is not None else load_tensor_file(files["calibration_file"][1])
                example, source = first_batch(tensors, spec["batch_size"]), "calibration"
            if example is None:
                raise InvalidArgumentError("`example` (one input batch) is needed to export the model when the "
                                           "calibration is a reference.")
            files["model_file"] = export_part(model, example, source)
        elif is_reference(model):
            spec["model"] = model
        elif isinstance(model, (str, Path)):
            files["model_file"] = read_file(model, "model")
        elif callable(model):
            spec["model"] = reference_of(model, "model")
        else:
            raise InvalidArgumentError(f"`model` must be an nn.Module, a .pt2 path or a factory reference, but got "
                                       f"{type(model).__name__}.")
        if weights is not None:
            files["weights_file"] = weights_part(weights)
        spec["name"] = name or _default_name(model)

        body = _validated(spec)
        parts: dict[str, Any] = {"spec": (None, body)}
        parts.update({role: (filename, data) for role, (filename, data) in files.items()})
        upload_timeout = httpx.Timeout(max(self.timeout, 300.0), connect=min(self.timeout, 10.0))
        response = self._request("POST", "/jobs", files=parts, timeout=upload_timeout)
        return Job(self, JobPublic.model_validate(response.json()))

    @staticmethod
    def _evaluation(spec: dict[str, Any], files: dict[str, tuple[str, bytes]], evaluate: Any, eval_data: Any,
                    labels: Any) -> None:
        if isinstance(evaluate, str) and evaluate in BUILTIN_EVALUATORS:
            spec["evaluator"] = evaluate
            if eval_data is not None:
                files["eval_file"] = tensor_part(eval_data, "eval_data", labels=labels)[0]
            elif labels is not None:
                raise InvalidArgumentError("`labels` need the inputs they label: give `eval_data` too.")
            return
        if eval_data is not None or labels is not None:
            raise InvalidArgumentError(f"`eval_data` and `labels` are the data of a built-in evaluator "
                                       f"({' | '.join(BUILTIN_EVALUATORS)}); `evaluate` is {evaluate!r}.")
        if isinstance(evaluate, str):
            spec["evaluate"] = evaluate  # the server checks it (and names it in its 422)
        elif callable(evaluate):
            spec["evaluate"] = reference_of(evaluate, "evaluate")
        else:
            raise InvalidArgumentError(f"`evaluate` must be a reference 'module:function' or one of "
                                       f"{BUILTIN_EVALUATORS}, but got {type(evaluate).__name__}.")


def _default_name(model: Any) -> str:
    if is_module(model):
        return type(model).__name__
    if isinstance(model, str) and ":" in model and not as_path(model):
        return model.rsplit(":", 1)[1]
    if isinstance(model, (str, Path)):
        return Path(model).stem or "job"
    return getattr(model, "__name__", "job")


def _validated(spec: dict[str, Any]) -> str:
    """The spec as JSON, checked with the API's own `JobCreate` before anything is sent (the
    message is the one the server would give)."""
    try:
        job = JobCreate.model_validate(spec)
    except ValidationError as exc:
        errors = exc.errors()
        loc = ".".join(str(p) for p in errors[0]["loc"])
        message = "; ".join(f"spec{'.' if e['loc'] else ''}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        raise InvalidInputError(message, code="invalid_input", field=f"spec.{loc}" if loc else "spec") from None
    return json.dumps(job.model_dump(mode="json", exclude_none=True))
