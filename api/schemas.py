"""The REST contract: pydantic models at the HTTP edge only (requests, responses, errors).

Families follow the FastAPI full-stack template: `JobCreate` (what a client sends),
`JobPublic` (what it gets back), `JobsPublic{data, count}` (a page). The SDK and the dashboard
import these same classes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuner.options import EVALUATE_ON, JOB_FIELDS, TuneOptions
from worker.references import REFERENCE_RE

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
TrialState = Literal["RUNNING", "COMPLETE", "FAIL", "PRUNED", "WAITING"]
Evaluator = Literal["top1", "agreement"]
Outcome = Literal["met", "not_met", "failed", "cancelled"]


# Multipart file parts of `POST /v1/jobs` (besides the `spec` JSON part).
FILE_PARTS: tuple[str, ...] = ("model_file", "weights_file", "calibration_file", "eval_file")


def _check_reference(value: str | None, what: str) -> str | None:
    if value is not None and not REFERENCE_RE.match(value):
        raise ValueError(f"{what} must be a reference 'package.module:callable', but got {value!r}.")
    return value


class FieldError(ValueError):
    """A check across fields of `JobCreate` that blames one of them (`spec_error` names it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class JobCreate(BaseModel):
    """The `spec` part of `POST /v1/jobs` (a JSON object). Which sources are used:

    - model: the `model_file` upload (a torch.export archive), or `model` = factory reference
      `module:callable` (optionally with a `weights_file` state dict);
    - calibration: the `calibration_file` upload, or `calibration` = reference returning batches;
    - evaluation: `evaluate` = reference `module:callable(model) -> float`, or `evaluator` =
      a built-in (`top1` needs an `eval_file` with inputs and `label`; `agreement` compares with
      the FP32 model's top-1 on `eval_file` inputs, or on the calibration data without one).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field("job", min_length=1, max_length=200)
    model: str | None = Field(None, max_length=300, description="Factory reference 'module:callable' returning the FP32 nn.Module.")
    calibration: str | None = Field(None, max_length=300, description="Reference 'module:callable' returning an iterable of batches.")
    evaluate: str | None = Field(None, max_length=300, description="Reference 'module:callable' taking the model, returning a float.")
    evaluator: Evaluator | None = Field(None, description="Built-in evaluator used instead of `evaluate`.")
    batch_size: int = Field(32, ge=1, le=65536, description="Batch size used to split uploaded calibration/eval tensors.")
    # the tuning options (`tuner.TuneOptions.JOB_FIELDS`), with its defaults; but a job has no trial limit
    # unless it sets one (the search ends by itself), where `tune()` stops at 50 by default
    max_drop: float = Field(TuneOptions.max_drop, ge=0.0, lt=1e9, description="Accuracy budget (relative share unless relative=false).")
    relative: bool = TuneOptions.relative
    higher_is_better: bool = TuneOptions.higher_is_better
    max_trials: int | None = Field(None, ge=1, le=100_000)
    timeout: float | None = Field(TuneOptions.timeout, gt=0, le=30 * 24 * 3600, description="Seconds of search before stopping.")
    trial_timeout: float | None = Field(None, ge=1, le=30 * 24 * 3600, description=(
        "Seconds one call of the evaluation may take; a trial over it fails ('timed out after Ns') and the search "
        "goes on. Default: the server's QUANTTUNE_TRIAL_TIMEOUT, else no limit."))
    space: dict[str, Any] | None = Field(TuneOptions.space, description="Search-space restriction passed to tune(space=...).")
    parallelism: int = Field(1, ge=1, le=64, description="How many workers may work on this job at once.")
    seed: int = Field(TuneOptions.seed, ge=0, le=2**31 - 1)
    evaluate_on: Literal[EVALUATE_ON] = Field(TuneOptions.evaluate_on, description=(
        "What each plan is scored on: 'onnxruntime' exports it and runs the evaluation on ONNX Runtime (the model "
        "users deploy; the final check then costs no evaluation), 'simulation' on the PyTorch simulation (no export "
        "per plan; the final check evaluates the exported model once)."))

    @field_validator("model", "calibration", "evaluate")
    @classmethod
    def _reference(cls, value: str | None, info: Any) -> str | None:
        return _check_reference(value, f"`{info.field_name}`")

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("`name` must not contain control characters.")
        return value

    def tune_options(self) -> TuneOptions:
        """The job's `tuner.TuneOptions` (the one place a spec becomes the tuner's options)."""
        return TuneOptions.from_dict({name: getattr(self, name) for name in JOB_FIELDS})

    @model_validator(mode="after")
    def _relative_budget(self) -> JobCreate:
        if self.relative and not self.max_drop < 1:
            raise FieldError("max_drop", f"`0 <= max_drop < 1` must hold for a relative budget, but got "
                                         f"max_drop={self.max_drop}.")
        if self.evaluate is not None and self.evaluator is not None:
            raise FieldError("evaluate", "give either `evaluate` (a reference) or `evaluator` (a built-in), not both.")
        if self.evaluate is None and self.evaluator is None:
            raise FieldError("evaluate", "an evaluation is required: `evaluate` (reference) or `evaluator` "
                                         "('top1' | 'agreement').")
        return self


class Progress(BaseModel):
    """Search progress, updated by the workers after every trial."""

    trials: int = Field(0, description="Finished trials (COMPLETE or FAIL) in the job's study.")
    evaluations: int = Field(0, description="Calls of the evaluation function so far.")
    best_score: float | None = None
    best_drop: float | None = None
    best_coverage: float | None = Field(None, description="Share of MACs in INT8 of the best plan (0..1).")
    met: bool | None = Field(None, description="Whether the best plan so far meets the budget.")


class LatencyPublic(BaseModel):
    """One setting of the deployed latency check: median ms of one call on ONNX Runtime (CPU)."""

    batch: int = Field(description="Batch size: 1, or the size of the first calibration batch.")
    threads: int | Literal["all"] = Field(description="Intra-op threads: 1, or 'all' (ONNX Runtime's default).")
    fp32_ms: float = Field(description="The same model exported all-FP32.")
    int8_ms: float = Field(description="The exported INT8 plan (model.onnx).")
    speedup: float = Field(description="fp32_ms / int8_ms: above 1, INT8 is faster.")


class FloatLayerPublic(BaseModel):
    """A layer the plan keeps INT8 that ONNX Runtime runs in float."""

    layer: str
    kernel: str | None = Field(None, description="What ONNX Runtime runs instead, e.g. 'Conv'.")
    reason: str | None = None


class DeploymentPublic(BaseModel):
    """The deployed check of the chosen plan: what ONNX Runtime runs (read from its optimized
    graph) and how fast against FP32. The full per-layer verdicts are in the report
    (`deployment.kernels.layers`)."""

    int8_layers: int | None = Field(None, description="Layers the plan keeps INT8.")
    int8_kernels: int | None = Field(None, description="Of those, the layers ONNX Runtime runs in INT8 kernels.")
    int8_macs_planned: float | None = Field(None, description="Share of MACs the plan keeps INT8 (0..1).")
    int8_macs_running: float | None = Field(None, description="Share of MACs that run in INT8 kernels (0..1).")
    float_layers: list[FloatLayerPublic] = Field(default_factory=list)
    calibration_batch: int | None = None
    latency: list[LatencyPublic] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict, description="Parts that could not be measured, and why.")
    scored_by: str | None = Field(None, description="Who measured `deployed_score`: 'search' (plans are scored on "
                                  "ONNX Runtime: the search scored this very file), 'check' (evaluated once more "
                                  "after the search), null (not measured).")


class JobPublic(BaseModel):
    id: int
    name: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    # what was submitted
    model_source: str = Field(description="'upload:<filename>' for a torch.export archive, else the factory reference.")
    calibration_source: str
    evaluation_source: str
    max_drop: float
    relative: bool
    higher_is_better: bool
    max_trials: int | None = None
    timeout: float | None = None
    trial_timeout: float | None = None
    space: dict[str, Any] | None = None
    parallelism: int
    seed: int
    evaluate_on: Literal[EVALUATE_ON] = Field(TuneOptions.evaluate_on,
                                              description="What each plan is scored on: 'onnxruntime' or 'simulation'.")
    workers: int = Field(0, description="Workers holding a live lease on this job now.")
    progress: Progress
    # the outcome (filled when the job succeeds; baseline as soon as it is known)
    baseline: float | None = None
    score: float | None = None
    drop: float | None = None
    coverage: float | None = Field(None, description="Share of MACs in INT8 of the chosen plan (0..1).")
    met: bool | None = Field(None, description="Whether the chosen plan's drop, as the search scored it (on ONNX "
                             "Runtime unless `deployment.scored_by` is 'check': then simulated), is within the "
                             "budget (the search's verdict; `outcome` is the job's).")
    deployed_score: float | None = Field(None, description="Score of the exported INT8 ONNX model on ONNX Runtime.")
    deployed_drop: float | None = Field(None, description="Drop of `deployed_score` against the baseline, as the "
                                        "budget measures it.")
    outcome: Outcome | None = Field(None, description=(
        "What the job delivered, null while queued or running: 'met' (succeeded and the model meets the budget, "
        "simulated and, where it was evaluated, on ONNX Runtime), 'not_met' (succeeded, artifacts and report "
        "available, but the budget is missed: by the best plan found, or by the exported model on ONNX Runtime), "
        "'failed', 'cancelled'."))
    deployment: DeploymentPublic | None = Field(None, description="INT8 kernels and latency vs FP32 on ONNX Runtime.")
    reason: str | None = Field(None, description="Why the budget was not met / the search stopped, when it applies.")
    error: str | None = Field(None, description="Why the job failed.")
    artifacts: list[str] = Field(default_factory=list, description="Names downloadable at /v1/jobs/{id}/artifacts/{name}.")


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Total number of matching jobs (all pages).")


class TrialPublic(BaseModel):
    number: int
    state: TrialState
    summary: str | None = None
    score: float | None = None
    drop: float | None = None
    coverage: float | None = None
    duration_s: float | None = None
    error: str | None = None
    fp32_layers: list[str] = Field(default_factory=list)
    duplicate_of: int | None = Field(None, description="Number of the earlier trial whose plan this one repeated (not re-evaluated).")
    worker: str | None = Field(None, description="The worker that ran the trial (host:pid:id).")
    evaluated: bool = Field(False, description="Whether the trial called the evaluation (not a repeat, not pruned).")
    params: dict[str, Any] = Field(default_factory=dict, description="The Optuna parameters of the trial.")
    plan: dict[str, Any] | None = Field(None, description="The full plan; only with ?include_plan=true.")
    started_at: datetime | None = None
    finished_at: datetime | None = None


class TrialsPublic(BaseModel):
    data: list[TrialPublic]
    count: int


class LedgerPublic(BaseModel):
    """Per-layer view of the search: layer names in order, and the tuner's ledger (from the
    report once the job succeeded, `null` before)."""

    layers: list[str] = Field(default_factory=list)
    baseline: float | None = None
    ledger: Any = None


class ArtifactPublic(BaseModel):
    name: str
    size: int
    sha256: str


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class HealthPublic(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    version: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. 'not_found', 'invalid_input'.")
    message: str = Field(description="Human-readable, names the field or value at fault.")
    field: str | None = Field(None, description="Dotted location of the offending input, e.g. 'spec.max_drop'.")


class ErrorBody(BaseModel):
    """The one error shape of every non-2xx response."""

    error: ErrorInfo


def spec_error(exc: ValidationError) -> tuple[str, str]:
    """The message and field of an invalid `JobCreate` (`spec.<field>: <rule>; ...`), as the API
    answers it and the SDK raises it before sending."""
    located = [_located(e) for e in exc.errors()]
    message = "; ".join(f"{where}: {text}" for where, text in located[:5])
    return message, located[0][0]


def _located(error: Any) -> tuple[str, str]:
    """(`spec.<field>`, message) of one pydantic error; a cross-field check names its field."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return f"spec.{cause.field}", str(cause)
    loc = ".".join(str(p) for p in error["loc"])
    text = str(cause) if isinstance(cause, ValueError) else error["msg"]
    return f"spec.{loc}" if loc else "spec", text
