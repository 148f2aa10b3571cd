"""The `quanttune` command line. Each group of commands lives in its own module and registers
itself on `app`; this module only assembles them."""

from __future__ import annotations

import typer

app = typer.Typer(help="quanttune: accuracy-aware INT8 quantization tuning.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def main() -> None:
    from . import cli_client  # noqa: F401  (submit, jobs, status, trials, report, download, cancel, wait)
    from . import cli_example  # noqa: F401  (registers its commands)
    from . import cli_service  # noqa: F401  (serve, worker, migrate, token)

    app()
