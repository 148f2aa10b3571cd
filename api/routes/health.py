from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from sqlalchemy import text

from .. import __version__
from ..deps import SessionDep
from ..schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic)
async def health(session: SessionDep) -> HealthPublic:
    """Liveness and database reachability (no auth)."""
    await run_in_threadpool(session.execute, text("SELECT 1"))
    return HealthPublic(status="ok", database="ok", version=__version__)
