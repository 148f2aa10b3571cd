"""Service commands: `quanttune serve | worker | migrate | token create | list | revoke`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


DbOption = Annotated[str | None, typer.Option("--db", help="Database URL (env QUANTTUNE_DB); default: SQLite in the data dir.")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (env QUANTTUNE_DATA_DIR).")]
CodeOption = Annotated[list[Path] | None, typer.Option(
    "--code", metavar="DIR", help="Directory of your code, put on the import path of the API and of every worker "
    "(repeatable; adds to env QUANTTUNE_CODE_DIRS).")]
AllowOption = Annotated[list[str] | None, typer.Option(
    "--allow", metavar="MODULE", help="Module prefix that job references may name, e.g. mypkg for "
    "mypkg.evals:accuracy (repeatable; adds to env QUANTTUNE_ALLOWED_MODULES, default tuner.examples).")]


def _settings(db: str | None, data_dir: Path | None, allow: list[str] | None = None,
              code: list[Path] | None = None):  # noqa: ANN202
    from worker.settings import get_settings, with_user_code

    return with_user_code(get_settings(db=db, data_dir=data_dir), allow or (), code or ())


def _user_code(settings, process: str) -> None:  # noqa: ANN001
    """Export the allowed modules and code dirs to the processes started from here (the workers, the
    API processes) and print them, warning about an allowed package that cannot be imported."""
    import importlib.util

    from worker.references import add_to_import_path

    os.environ.update(QUANTTUNE_ALLOWED_MODULES=",".join(settings.allowed_modules),
                      QUANTTUNE_CODE_DIRS=os.pathsep.join(map(str, settings.code_dirs)))
    add_to_import_path(settings.code_dirs)
    typer.echo(f"{process}: references allowed in modules {', '.join(settings.allowed_modules) or '(none)'} (--allow); "
               f"code dirs {', '.join(map(str, settings.code_dirs)) or '(none)'} (--code)")
    for missing in (str(d) for d in settings.code_dirs if not d.is_dir()):
        typer.echo(f"warning: code dir {missing} is not a directory", err=True)
    for module in settings.allowed_modules:
        try:
            found = importlib.util.find_spec(module.partition(".")[0]) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            typer.echo(f"warning: allowed module {module!r} cannot be imported here; put the directory that holds "
                       f"it on the import path with --code DIR", err=True)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def migrate(db: DbOption = None, data_dir: DataDirOption = None) -> None:
    """Create or upgrade the database schema (service tables and Optuna's storage)."""
    from worker.migrate import migrate as run_migrate

    settings = _settings(db, data_dir)
    run_migrate(settings.db_url)
    typer.echo(f"database ready: {_safe(settings.db_url)}")


NOT_A_DATABASE = ("run it where `quanttune serve` runs (its ./quanttune-data), or give `--db URL` or "
                  "`--data-dir DIR` (env QUANTTUNE_DB / QUANTTUNE_DATA_DIR); `quanttune migrate` creates a database.")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@contextlib.contextmanager
def _token_store(db: str | None, data_dir: Path | None) -> Iterator[Session]:
    """A session on the service database; any database error is one line naming `--db` / `--data-dir`."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.engine import make_url

    from worker.db import is_sqlite, make_engine, make_sessionmaker

    url = _settings(db, data_dir).db_url
    try:
        if is_sqlite(url) and not Path(make_url(url).database or "").is_file():  # connecting would create it
            raise _fail(f"no quanttune database at {make_url(url).database}: {NOT_A_DATABASE}")
        engine = make_engine(url)
        try:
            if not inspect(engine).has_table("qt_tokens"):
                raise _fail(f"{_safe(url)} is not a quanttune database (no tables): {NOT_A_DATABASE}")
            with make_sessionmaker(engine)() as session:
                yield session
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise _fail(f"cannot use the database {_safe(url)}: {first}; {NOT_A_DATABASE}") from None


def token_create(name: Annotated[str, typer.Option("--name", help="Who the token is for.")],
                 db: DbOption = None, data_dir: DataDirOption = None) -> None:
    """Create an API token and print it (only its hash is stored)."""
    from ..auth import create_token

    with _token_store(db, data_dir) as session:
        typer.echo(create_token(session, name))


def token_list(db: DbOption = None, data_dir: DataDirOption = None,
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """List the API tokens: id, name, created, active or revoked, and how many jobs each owns."""
    from ..auth import token_rows

    with _token_store(db, data_dir) as session:
        rows = token_rows(session)
    if as_json:
        typer.echo(json.dumps({"data": rows, "count": len(rows)}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="API tokens", caption=None if rows else "no tokens: `quanttune token create --name NAME`")
    for column in ("id", "name", "state", "jobs", "created"):
        table.add_column(column, justify="right" if column in ("id", "jobs") else "left")
    for row in rows:
        table.add_row(str(row["id"]), row["name"], row["state"], str(row["jobs"]), row["created_at"])
    Console().print(table)


def token_revoke(token_id: Annotated[int, typer.Argument(help="Token id (from `quanttune token list`).", min=1)],
                 db: DbOption = None, data_dir: DataDirOption = None) -> None:
    """Revoke a token: it no longer authenticates and its dashboard sessions end; its jobs stay."""
    from ..auth import revoke_token

    with _token_store(db, data_dir) as session:
        name = revoke_token(session, token_id)
    if name is None:
        raise _fail(f"no token with id {token_id}: `quanttune token list` shows them.")
    typer.echo(f"token {token_id} ({name}) revoked")


def worker(db: DbOption = None, data_dir: DataDirOption = None, code: CodeOption = None,
           allow: AllowOption = None) -> None:
    """Run one worker: claims jobs from the database and tunes them (SIGTERM stops it cleanly).
    Give it the same --code / --allow as the API."""
    from worker import run_worker

    _logging()
    settings = _settings(db, data_dir, allow, code)
    _user_code(settings, "quanttune worker")
    run_worker(settings)


def serve(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Worker processes to start beside the API.")] = 1,
    api_processes: Annotated[int, typer.Option("--api-processes", min=1, max=64, envvar="QUANTTUNE_API_PROCESSES",
                                               help="API server processes sharing the port (one per core serves "
                                                    "the most requests).")] = 1,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log",
                                             help="Log one line per HTTP request.")] = True,
    migrate_db: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Migrate the database first.")] = True,
    code: CodeOption = None,
    allow: AllowOption = None,
) -> None:
    """Run the API plus N worker processes (the embedded default: SQLite under ./quanttune-data)."""
    import uvicorn

    from worker.db import is_sqlite
    from worker.signals import die_with_parent  # in each worker child: SIGTERM when `serve` dies, even by SIGKILL

    _logging()
    settings = _settings(db, data_dir, allow, code)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate_db:
        from worker.migrate import migrate as run_migrate

        run_migrate(settings.db_url)
    if is_sqlite(settings.db_url):
        _first_token(settings)
    # the workers and each API process read their settings from this environment
    os.environ.update(QUANTTUNE_DB=settings.db_url, QUANTTUNE_DATA_DIR=str(settings.data_dir))
    _user_code(settings, "quanttune serve")  # before the workers start: they inherit it
    children = [subprocess.Popen([sys.executable, "-m", "worker"], preexec_fn=die_with_parent)
                for _ in range(workers)]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    typer.echo(f"quanttune API on {url}  ({api_processes} API process(es), {workers} worker(s), "
               f"database {_safe(settings.db_url)})\ndashboard: {url}/dashboard/")

    def _exit(signum: int, _frame: object) -> None:  # uvicorn re-raises SIGTERM after its graceful shutdown
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)  # so that the `finally` below still stops the workers
    try:
        uvicorn.run("api.app:create_app", factory=True, workers=api_processes, host=host, port=port,
                    log_level="info", access_log=access_log)
    finally:
        _stop(children)


def _first_token(settings) -> None:  # noqa: ANN001
    """Embedded (SQLite) convenience: on a database without any token, create one and print it once."""
    from sqlalchemy import func, select

    from ..auth import create_token
    from worker.db import make_engine, make_sessionmaker
    from worker.models import Token

    engine = make_engine(settings.db_url)
    with make_sessionmaker(engine)() as session:
        if not session.scalar(select(func.count()).select_from(Token)):
            typer.echo(f"no API token existed: created one named 'default': {create_token(session, 'default')}")
    engine.dispose()


def _stop(children: list[subprocess.Popen], grace: float = 20.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def register(app: typer.Typer) -> None:
    """Add `migrate`, `worker`, `serve` and the `token` group to `app`."""
    for command in (migrate, worker, serve):
        app.command()(command)
    token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
    token_app.command("create")(token_create)
    token_app.command("list")(token_list)
    token_app.command("revoke")(token_revoke)
    app.add_typer(token_app, name="token")
