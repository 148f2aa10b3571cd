"""`/v1/jobs/{id}/trials` and `/v1/jobs/{id}/ledger`: read from the job's Optuna study."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ..deps import JobDep, SessionDep, StudiesDep
from ..jobs import report_content
from ..public import trial_public
from ..schemas import FINISHED_STATUSES, ErrorBody, LedgerPublic, TrialsPublic

router = APIRouter(prefix="/jobs/{job_id}", tags=["trials"])
_ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}


@router.get("/trials", response_model=TrialsPublic, responses=_ERRORS)
async def trials(
    job: JobDep,
    studies: StudiesDep,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    state: Annotated[Literal["COMPLETE", "FAIL", "RUNNING", "PRUNED", "WAITING"] | None, Query()] = None,
    include_plan: bool = False,
) -> TrialsPublic:
    """The job's trials in trial-number order."""

    def page() -> TrialsPublic:  # read routes: all database work in one thread-pool call
        finished_at = job.finished_at if job.status in FINISHED_STATUSES else None
        found = [t for t in studies.trials(job.id, finished_at) if state is None or t.state.name == state]
        found.sort(key=lambda t: t.number)
        chosen = found[offset : offset + limit]
        return TrialsPublic(data=[trial_public(t, include_plan=include_plan) for t in chosen], count=len(found))

    return await run_in_threadpool(page)


@router.get("/ledger", response_model=LedgerPublic, responses=_ERRORS)
async def ledger(job: JobDep, session: SessionDep, studies: StudiesDep) -> LedgerPublic:
    """Layer names (once the search started) and the per-layer ledger (once the job succeeded)."""

    def read() -> LedgerPublic:
        attrs = studies.user_attrs(job.id)
        content = report_content(session, job.id) or {}
        return LedgerPublic(layers=list(attrs.get("layers") or content.get("layers") or []),
                            baseline=attrs.get("baseline", job.baseline), ledger=content.get("ledger"))

    return await run_in_threadpool(read)
