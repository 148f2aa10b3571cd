"""`/v1/jobs`: create (multipart), list, get, cancel, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from ..auth import Owner
from ..deps import JobDep, SessionDep, SettingsDep, StudiesDep
from ..forms import StrictFormRoute
from ..jobs import (
    Upload,
    cancel_job,
    check_submission,
    create_job,
    delete_job,
    jobs_public,
    list_jobs,
    parse_spec,
    safe_filename,
)
from ..schemas import ErrorBody, JobPublic, JobsPublic, JobStatus
from ..threads import run_upload_work

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=StrictFormRoute)  # text parts must be valid text
_ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}
_DEFAULT_NAMES = {"model_file": "model.pt2", "weights_file": "weights.safetensors",
                  "calibration_file": "calibration.safetensors", "eval_file": "eval.safetensors"}


@router.post("", status_code=201, response_model=JobPublic,
             responses={**_ERRORS, 400: {"model": ErrorBody}, 413: {"model": ErrorBody}})
async def create(
    owner: Owner,
    session: SessionDep,
    settings: SettingsDep,
    spec: Annotated[str, Form(description="JSON object, see JobCreate.")],
    model_file: Annotated[UploadFile | None, File(description="torch.export archive (.pt2)")] = None,
    weights_file: Annotated[UploadFile | None, File(description="state dict: safetensors or weights-only .pt")] = None,
    calibration_file: Annotated[UploadFile | None, File(description="calibration tensors (see docs/api.md)")] = None,
    eval_file: Annotated[UploadFile | None, File(description="data of the built-in evaluator")] = None,
) -> JobPublic:
    """Submit a job. Everything is checked before anything is stored."""
    # the auth check has handed its connection back (`current_owner`): none is held while the uploads
    # are read and checked (seconds for a large model)
    job_spec = parse_spec(spec)
    uploads: dict[str, Upload] = {}
    for role, part in (("model_file", model_file), ("weights_file", weights_file),
                       ("calibration_file", calibration_file), ("eval_file", eval_file)):
        if part is not None:
            uploads[role] = Upload(role, safe_filename(part.filename, _DEFAULT_NAMES[role]), await part.read())
    await run_upload_work(check_submission, job_spec, uploads, settings)
    job = await run_upload_work(create_job, session, owner.id, job_spec, uploads)
    return jobs_public(session, [job])[0]


@router.get("", response_model=JobsPublic, responses=_ERRORS)
async def index(
    owner: Owner,
    session: SessionDep,
    status: Annotated[JobStatus | None, Query()] = None,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobsPublic:
    """The caller's jobs, newest first."""

    def page() -> JobsPublic:  # read routes: all database work in one thread-pool call
        jobs, count = list_jobs(session, owner.id, status, offset, limit)
        return JobsPublic(data=jobs_public(session, jobs), count=count)

    return await run_in_threadpool(page)


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
async def read(job: JobDep, session: SessionDep) -> JobPublic:
    return (await run_in_threadpool(jobs_public, session, [job]))[0]


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={**_ERRORS, 409: {"model": ErrorBody}})
def cancel(job: JobDep, session: SessionDep) -> JobPublic:
    """Cancel a queued or running job; workers stop before their next trial."""
    return jobs_public(session, [cancel_job(session, job)])[0]


@router.delete("/{job_id}", status_code=204, response_class=Response, responses={**_ERRORS, 409: {"model": ErrorBody}})
def delete(job: JobDep, session: SessionDep, studies: StudiesDep) -> Response:
    """Delete a job, its uploads, artifacts and Optuna study (its trials). A running job is refused
    (409): cancel it first."""
    job_id = job.id
    delete_job(session, job)
    studies.delete(job_id)
    return Response(status_code=204)
