"""The Python SDK of the quanttune service (REST contract: docs/api.md).

    from quanttune import Client

    client = Client("http://127.0.0.1:8000", token)          # or QUANTTUNE_URL / QUANTTUNE_TOKEN
    job = client.submit(model, calibration_batches, "tuner.examples.digits:evaluate", max_drop=0.01)
    job.wait()                                               # live progress bar; raises if it fails
    int8 = job.load_model()                                  # ONNX Runtime, called like `model`

Responses are the API's own pydantic models (`api.schemas`); errors are the typed exceptions of
`api.client.errors`, carrying the server's message. Requests time out after `timeout` seconds;
connection failures (and, for reads, dropped connections and 502/503/504) are retried `retries`
times with exponential backoff. torch is imported only when a model or tensors are given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from tuner.options import JOB_FIELDS, TuneOptions

from ..schemas import HealthPublic, JobCreate, JobPublic, JobsPublic, JobStatus, spec_error
from .errors import ClientArgumentError, InvalidInputError
from .job import Job
from .transport import Transport
from .upload import (
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

DEFAULT_URL = "http://127.0.0.1:8000"
Files = dict[str, tuple[str, bytes]]


class Client:
    """A connection to a quanttune server.

    `url` defaults to `$QUANTTUNE_URL` (else http://127.0.0.1:8000) and `token` to
    `$QUANTTUNE_TOKEN`. `timeout`: seconds per request (uploads get at least 300). `retries`:
    further attempts after a connection failure, `backoff` seconds apart, doubling each time."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ClientArgumentError(f"`timeout > 0`, `retries >= 0` and `backoff >= 0` must hold, but got "
                                       f"{timeout=}, {retries=}, {backoff=}.")
        url = (url or os.environ.get("QUANTTUNE_URL") or DEFAULT_URL).rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        token = token if token is not None else os.environ.get("QUANTTUNE_TOKEN")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.http = Transport(self.url, token, timeout=timeout, retries=retries, backoff=backoff, transport=transport)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- jobs ------------------------------------------------------------------------------------
    def health(self) -> HealthPublic:
        """The server's health (needs no token)."""
        return HealthPublic.model_validate(self.http.get("/health").json())

    def jobs_page(self, status: JobStatus | None = None, *, offset: int = 0, limit: int = 50) -> JobsPublic:
        """One page of this token's jobs, newest first, with the total `count`."""
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if status is not None:
            params["status"] = status
        return JobsPublic.model_validate(self.http.get("/jobs", params=params).json())

    def jobs(self, status: JobStatus | None = None, *, offset: int = 0, limit: int = 50) -> list[Job]:
        """This token's jobs (newest first), optionally only those with `status`."""
        return [Job(self.http, info) for info in self.jobs_page(status, offset=offset, limit=limit).data]

    def job(self, job_id: int) -> Job:
        """The job with this id (`NotFoundError` if it does not exist or belongs to another token)."""
        return Job(self.http, JobPublic.model_validate(self.http.get(f"/jobs/{int(job_id)}").json()))

    def submit(
        self,
        model: Any,
        calibration: Any,
        evaluate: Any,
        *,
        options: TuneOptions | None = None,
        example: Any = None,
        weights: Any = None,
        eval_data: Any = None,
        labels: Any = None,
        name: str | None = None,
        batch_size: int | None = None,
        trial_timeout: float | None = None,
        parallelism: int = 1,
        **tuning: Any,
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
        - the budget and limits of `tuner.tune`: a `TuneOptions` (`options=`; its job fields are
          sent) and/or its job fields as keywords: `max_drop`, `relative`, `higher_is_better`,
          `max_trials`, `timeout` (seconds), `space`, `seed`, `evaluate_on` (what is not given takes the server's
          defaults, those of `TuneOptions` except `max_trials`: no limit); `parallelism`: workers
          at once; `trial_timeout`: seconds one evaluation may take before its trial fails (the
          search goes on).

        References must be allowed by the server (`serve --allow`, `QUANTTUNE_ALLOWED_MODULES`), else
        `InvalidInputError` (422) with the server's message naming the field.
        """
        spec = _job_options(options, tuning)
        spec.update(trial_timeout=trial_timeout, parallelism=parallelism)
        files: Files = {}
        _evaluation(spec, files, evaluate, eval_data, labels)
        named, first = _calibration(spec, files, calibration)
        spec["batch_size"] = batch_size or first or 32
        _model(spec, files, model, example, named)
        if weights is not None:
            files["weights_file"] = weights_part(weights)
        spec["name"] = name or _default_name(model)

        parts: dict[str, Any] = {"spec": (None, _validated(spec))}
        parts.update({role: (filename, data) for role, (filename, data) in files.items()})
        response = self.http.request("POST", "/jobs", files=parts, timeout=self.http.upload_timeout())
        return Job(self.http, JobPublic.model_validate(response.json()))


def _job_options(options: TuneOptions | None, tuning: dict[str, Any]) -> dict[str, Any]:
    """The tuning options of a job's spec: those of `options`, then the keywords."""
    unknown = sorted(set(tuning) - set(JOB_FIELDS))
    if unknown:
        raise TypeError(f"submit() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the tuning "
                        f"options of a job are {', '.join(JOB_FIELDS)}.")
    if options is not None and not isinstance(options, TuneOptions):
        raise ClientArgumentError(f"`options` must be a tuner.TuneOptions, but got {type(options).__name__}.")
    return {**(options.job_fields() if options is not None else {}), **tuning}


def _calibration(spec: dict[str, Any], files: Files, calibration: Any) -> tuple[dict[str, Any] | None, int | None]:
    """A reference in the spec, or an upload; returns the uploaded tensors and the first batch's size."""
    if is_reference(calibration):
        spec["calibration"] = calibration
    elif callable(calibration) and not (is_module(calibration) or is_tensor(calibration)):
        spec["calibration"] = reference_of(calibration, "calibration")
    else:
        files["calibration_file"], named, first = tensor_part(calibration, "calibration")
        return named, first
    return None, None


def _model(spec: dict[str, Any], files: Files, model: Any, example: Any, named: dict[str, Any] | None) -> None:
    if is_module(model):
        source = "example"
        if example is None and "calibration_file" in files:
            tensors = named if named is not None else load_tensor_file(files["calibration_file"][1])
            example, source = first_batch(tensors, spec["batch_size"]), "calibration"
        if example is None:
            raise ClientArgumentError("`example` (one input batch) is needed to export the model when the "
                                      "calibration is a reference.")
        files["model_file"] = export_part(model, example, source)
    elif is_reference(model):
        spec["model"] = model
    elif isinstance(model, (str, Path)):
        files["model_file"] = read_file(model, "model")
    elif callable(model):
        spec["model"] = reference_of(model, "model")
    else:
        raise ClientArgumentError(f"`model` must be an nn.Module, a .pt2 path or a factory reference, but got "
                                  f"{type(model).__name__}.")


def _evaluation(spec: dict[str, Any], files: Files, evaluate: Any, eval_data: Any, labels: Any) -> None:
    if isinstance(evaluate, str) and evaluate in BUILTIN_EVALUATORS:
        spec["evaluator"] = evaluate
        if eval_data is not None:
            files["eval_file"] = tensor_part(eval_data, "eval_data", labels=labels)[0]
        elif labels is not None:
            raise ClientArgumentError("`labels` need the inputs they label: give `eval_data` too.")
        return
    if eval_data is not None or labels is not None:
        raise ClientArgumentError(f"`eval_data` and `labels` are the data of a built-in evaluator "
                                  f"({' | '.join(BUILTIN_EVALUATORS)}); `evaluate` is {evaluate!r}.")
    if isinstance(evaluate, str):
        spec["evaluate"] = evaluate  # the server checks it (and names it in its 422)
    elif callable(evaluate):
        spec["evaluate"] = reference_of(evaluate, "evaluate")
    else:
        raise ClientArgumentError(f"`evaluate` must be a reference 'module:function' or one of "
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
        message, field = spec_error(exc)
        raise InvalidInputError(message, code="invalid_input", field=field) from None
    return json.dumps(job.model_dump(mode="json", exclude_none=True))
