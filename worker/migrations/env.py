"""Alembic environment of the service tables. Optuna keeps its own tables and its own
`alembic_version` table in the same database, so ours is `qt_alembic_version`."""

from __future__ import annotations

from alembic import context

from worker.db import make_engine
from worker.models import Base

VERSION_TABLE = "qt_alembic_version"
config = context.config
target_metadata = Base.metadata


def _include(obj, name, type_, reflected, compare_to) -> bool:  # noqa: ANN001
    # autogenerate must never propose dropping Optuna's tables
    return not (type_ == "table" and reflected and compare_to is None and not name.startswith("qt_"))


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, version_table=VERSION_TABLE, include_object=_include)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connection)


def _run(connection) -> None:  # noqa: ANN001
    context.configure(connection=connection, target_metadata=target_metadata, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite", include_object=_include)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
