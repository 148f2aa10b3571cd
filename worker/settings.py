"""Service settings from the environment (prefix `QUANTTUNE_`), built by one factory.

    QUANTTUNE_DB=postgresql+psycopg://user:pw@host/db   (default: SQLite file in the data dir)
    QUANTTUNE_DATA_DIR=./quanttune-data
    QUANTTUNE_ALLOWED_MODULES=tuner.examples,mycompany.models   (`--allow` of serve / worker adds to it)
    QUANTTUNE_CODE_DIRS=/srv/code:/srv/more   (os.pathsep-separated; `--code` of serve / worker adds to it)

Allowed modules are the prefixes references (`package.module:callable`) may name; code dirs are
put on the import path of the API and the workers before a reference is imported (see
`worker.references`).
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUANTTUNE_", extra="ignore")

    db: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/quanttune.db")
    data_dir: Path = Path("quanttune-data")
    allowed_modules: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["tuner.examples"])
    code_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list, description="Directories of user "
                                                        "code, put on the import path before a reference is imported.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    lease_seconds: float = Field(30.0, gt=0, description="A claim not renewed for this long may be reclaimed.")
    heartbeat_seconds: float | None = Field(None, gt=0, description="Lease renewal period; default lease_seconds / 3.")
    trial_heartbeat_seconds: int = Field(5, ge=1, description="Optuna trial heartbeat period (RDB storage).")
    trial_grace_seconds: int = Field(30, ge=2, description="A RUNNING trial without heartbeat this long is failed and retried.")
    poll_seconds: float = Field(1.0, gt=0, description="How often an idle worker looks for a job.")
    api_threads: int | None = Field(None, ge=1, le=256, description="Threads for the API's database work, per API "
                                    "process; default 2 on SQLite, 8 on PostgreSQL (see api/threads.py).")
    trial_timeout: float | None = Field(None, gt=0, description="Default per-evaluation time limit (s) of jobs that "
                                        "set no `trial_timeout`; None: no limit.")

    @field_validator("allowed_modules", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("code_dirs", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(os.pathsep) if part.strip()]
        return value

    @field_validator("code_dirs", mode="after")
    @classmethod
    def _absolute(cls, value: list[Path]) -> list[Path]:
        return list(dict.fromkeys(path.expanduser().resolve() for path in value))

    @field_validator("db", mode="before")
    @classmethod
    def _normalise_db(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("postgresql://"):
            return "postgresql+psycopg://" + value[len("postgresql://"):]  # psycopg 3, not psycopg2
        if isinstance(value, str) and value.startswith("postgres://"):
            return "postgresql+psycopg://" + value[len("postgres://"):]
        return value

    @property
    def db_url(self) -> str:
        if self.db:
            return self.db
        return f"sqlite:///{(self.data_dir / 'quanttune.db').resolve()}"

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3


def get_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. CLI options) on top;
    `None` overrides are ignored so that unset options fall back to the environment."""
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def with_user_code(settings: Settings, allow: Sequence[str] = (), code: Sequence[Path] = ()) -> Settings:
    """`settings` with the module prefixes `allow` added to the allowed modules and the directories
    `code` to the code dirs (the `--allow` / `--code` options of `quanttune serve | worker`)."""
    allowed = list(dict.fromkeys([*settings.allowed_modules, *(m.strip() for m in allow if m.strip())]))
    dirs = list(dict.fromkeys([*settings.code_dirs, *(Path(d).expanduser().resolve() for d in code)]))
    return settings.model_copy(update={"allowed_modules": allowed, "code_dirs": dirs})
