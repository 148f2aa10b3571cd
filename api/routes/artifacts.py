"""`/v1/jobs/{id}/report` and `/v1/jobs/{id}/artifacts[/{name}]`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from worker.models import JobFile

from ..deps import JobDep, SessionDep
from ..errors import NotFound, NotReady
from ..jobs import artifact, report_content
from ..schemas import ArtifactPublic, ArtifactsPublic, ErrorBody

router = APIRouter(prefix="/jobs/{job_id}", tags=["artifacts"])
_ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}
MEDIA = {".onnx": "application/octet-stream", ".json": "application/json"}


@router.get("/report", responses={**_ERRORS, 409: {"model": ErrorBody}})
async def report(job: JobDep, session: SessionDep) -> dict[str, Any]:
    """The content of report.json (409 not_ready until the job succeeded)."""
    content = await run_in_threadpool(report_content, session, job.id)
    if content is None:
        raise NotReady(f"job {job.id} is {job.status}: its report exists once it succeeded.")
    return content


@router.get("/artifacts", response_model=ArtifactsPublic, responses=_ERRORS)
async def artifacts(job: JobDep, session: SessionDep) -> ArtifactsPublic:
    def rows() -> list:  # read routes: all database work in one thread-pool call
        return session.execute(select(JobFile.role, JobFile.size, JobFile.sha256).where(
            JobFile.job_id == job.id, JobFile.kind == "artifact").order_by(JobFile.role)).all()

    data = [ArtifactPublic(name=role, size=size, sha256=sha) for role, size, sha in await run_in_threadpool(rows)]
    return ArtifactsPublic(data=data, count=len(data))


@router.get("/artifacts/{name}", response_class=Response, responses={
    **_ERRORS, 409: {"model": ErrorBody},
    200: {"description": "The file: model.onnx as octet-stream, plan.json and report.json as JSON.",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": {"type": "object"}}}}})
def download(job: JobDep, session: SessionDep,
             name: Annotated[str, Path(max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]) -> Response:
    """Download one artifact as an attachment (names are fixed by the server: model.onnx,
    plan.json, report.json)."""
    found = artifact(session, job.id, name)
    if found is None:
        if job.status != "succeeded":
            raise NotReady(f"job {job.id} is {job.status}: artifacts exist once it succeeded.")
        raise NotFound(f"job {job.id} has no artifact {name!r}.")
    suffix = name[name.rfind("."):] if "." in name else ""
    return Response(found.data, media_type=MEDIA.get(suffix, "application/octet-stream"),
                    headers={"Content-Disposition": f'attachment; filename="{found.role}"',
                             "X-Content-Type-Options": "nosniff"})
