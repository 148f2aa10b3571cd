"""The `quanttune` command line, assembled in one place: each group of commands lives in its own
module (`client`: submit, jobs, status, trials, report, download, cancel, wait; `demo`;
`service`: serve, worker, migrate, token) and is registered here, explicitly."""

from __future__ import annotations

import typer

from . import client, demo, service


def build_app() -> typer.Typer:
    app = typer.Typer(help="quanttune: accuracy-aware INT8 quantization tuning.", no_args_is_help=True,
                      pretty_exceptions_enable=False)
    client.register(app)
    demo.register(app)
    service.register(app)
    return app


app = build_app()


def main() -> None:
    app()
