"""`quanttune migrate` on SQLite and PostgreSQL: service tables at the Alembic head, Optuna's
storage usable, idempotent, and the two Alembic version tables kept apart."""

from __future__ import annotations

import optuna
from sqlalchemy import inspect

from worker.db import make_engine
from worker.migrate import current_revision, migrate


def test_migrate_creates_both_schemas_and_is_idempotent(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)  # a second run (e.g. `serve` after `migrate`) changes nothing and does not fail
    engine = make_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"qt_tokens", "qt_jobs", "qt_files", "qt_leases", "qt_alembic_version"} <= tables
    assert {"studies", "trials", "trial_heartbeats", "alembic_version"} <= tables  # Optuna's own
    assert current_revision(db_url) == "0002"
    engine = make_engine(db_url)
    assert "deployment" in {c["name"] for c in inspect(engine).get_columns("qt_jobs")}  # 0002: the deployed check
    engine.dispose()
    storage = optuna.storages.RDBStorage(db_url, skip_table_creation=True)
    assert storage.get_current_version() == storage.get_head_version()
    study = optuna.create_study(storage=storage, study_name="job-1")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="job-1", storage=db_url).trials) == 2
    storage.engine.dispose()
