"""Dependencies shared by the routers: the settings, a database session, the Optuna reader and the
job of the request (404 unless owned by the caller)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session

from worker.models import JobRecord
from worker.settings import Settings
from worker.studies import Studies

from .auth import DOCUMENTED_BEARER, authenticate
from .jobs import get_owned
from .sessions import request_session


get_session = request_session  # async: no thread-pool round trip for what does no I/O


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_studies(request: Request) -> Studies:
    return request.app.state.studies


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StudiesDep = Annotated[Studies, Depends(get_studies)]


def owned_job(request: Request, session: SessionDep, job_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
              _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(DOCUMENTED_BEARER)] = None) -> JobRecord:
    """The job of the path, if the caller owns it (404 otherwise). Authenticates itself rather than
    depending on `Owner`: one thread-pool call instead of two on every job route."""
    return get_owned(session, authenticate(request, session).id, job_id)


JobDep = Annotated[JobRecord, Depends(owned_job)]
