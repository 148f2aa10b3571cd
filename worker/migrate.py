"""`quanttune migrate`: create or upgrade the service schema (Alembic, scripts shipped inside the
`api` package) and Optuna's RDB schema, in the same database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from .db import is_sqlite, make_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Upgrade the service tables to head, then let Optuna create/upgrade its own tables."""
    if is_sqlite(url):
        _prepare_sqlite(url)
    command.upgrade(alembic_config(url), "head")
    import optuna

    storage = optuna.storages.RDBStorage(url)  # creates Optuna's tables when missing
    if storage.get_current_version() != storage.get_head_version():
        storage.upgrade()
    storage.remove_session()
    storage.engine.dispose()


def _prepare_sqlite(url: str) -> None:
    """Create the file's directory and switch the file to WAL (persistent), so that the API,
    the workers and Optuna can read while one of them writes."""
    database = make_engine(url).url.database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    with engine.connect() as connection:
        connection.execute(text("PRAGMA journal_mode=WAL"))
    engine.dispose()


def current_revision(url: str) -> str | None:
    from alembic.migration import MigrationContext

    engine = make_engine(url)
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection, opts={"version_table": "qt_alembic_version"}).get_current_revision()
    engine.dispose()
    return revision
