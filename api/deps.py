"""Dependencies shared by the routers: the settings, a database session, the Optuna reader and the
job of the request (404 unless owned by the caller)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from .auth import Owner
from .jobs import get_owned
from .models import Job
from .settings import Settings
from .studies import Studies


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_studies(request: Request) -> Studies:
    return request.app.state.studies


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StudiesDep = Annotated[Studies, Depends(get_studies)]


def owned_job(owner: Owner, session: SessionDep, job_id: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> Job:
    return get_owned(session, owner.id, job_id)


JobDep = Annotated[Job, Depends(owned_job)]
