"""Client commands: `quanttune submit | jobs | status | trials | report | download | cancel | delete | wait`.

The server URL and token come from `--url` / `--token` or `QUANTTUNE_URL` / `QUANTTUNE_TOKEN`.
Tables for humans, `--json` for scripts (the API's own shapes). Exit codes: 0 done; 1 the
request was refused (the server's message on stderr) or the server could not be reached; 2 bad
usage; 3 the job failed or was cancelled (`--wait`, `wait`); 4 the job finished without meeting its
accuracy budget (`--wait`, `wait`: its report and artifacts are there to read); 130 Ctrl-C while
waiting (the job goes on).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from tuner.options import TuneOptions


if TYPE_CHECKING:
    from ..client import Client

F = TypeVar("F", bound=Callable[..., Any])
CONNECTION = "Connection"
EXIT_REFUSED, EXIT_JOB, EXIT_NOT_MET = 1, 3, 4

UrlOption = Annotated[str | None, typer.Option("--url", envvar="QUANTTUNE_URL", show_default=False, rich_help_panel=CONNECTION,
                                               help="Server URL [default: http://127.0.0.1:8000].")]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="QUANTTUNE_TOKEN", show_default=False,
                                                 rich_help_panel=CONNECTION, help="API token.")]
RequestTimeout = Annotated[float, typer.Option("--request-timeout", min=0.1, rich_help_panel=CONNECTION,
                                               help="Seconds per HTTP request.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (the API's shapes) instead of tables.")]
JobId = Annotated[int, typer.Argument(help="Job id.", min=1)]


def _client(url: str | None, token: str | None, timeout: float = 30.0) -> Client:
    from ..client import Client

    return Client(url, token, timeout=timeout)


def _console():  # noqa: ANN202
    from rich.console import Console

    return Console()


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json")


def _fail(message: str, code: int) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


# the API's names for what the CLI calls by its flags (messages from the server and the SDK)
FLAGS = {"model_file": "MODEL", "spec.model": "MODEL", "weights_file": "--weights", "calibration_file": "--calibration",
         "spec.calibration": "--calibration", "eval_file": "--eval-data", "eval_data": "--eval-data",
         "spec.evaluate": "--evaluate", "spec.evaluator": "--evaluate", "spec.space": "--space",
         **{f"spec.{name}": "--" + name.replace("_", "-") for name in (
             "name", "batch_size", "max_drop", "max_trials", "timeout", "trial_timeout", "parallelism", "seed",
             "evaluate_on")},
         "spec.relative": "--relative/--absolute", "spec.higher_is_better": "--higher-is-better/--lower-is-better"}
_API_NAMES = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(n) for n in sorted(FLAGS, key=len, reverse=True)) + r")(?![\w])")
NO_TOKEN = ("no API token: set QUANTTUNE_TOKEN or pass --token (`quanttune token create --name NAME` makes one "
            "where the server runs).")


def in_flags(text: str) -> str:
    """A message with the API's part and spec names (`eval_file`, `spec.max_drop`) replaced by the
    CLI's flags (`--eval-data`, `--max-drop`)."""
    return _API_NAMES.sub(lambda m: FLAGS[m.group(1)], text)


def _error(exc: Exception, token: str | None) -> tuple[str, int, dict[str, Any]]:
    """(message, exit code, JSON error body) of an SDK error."""
    from ..client.errors import APIError, AuthenticationError, BudgetNotMetError, JobError

    if isinstance(exc, AuthenticationError) and not token:
        return NO_TOKEN, EXIT_REFUSED, {"code": "no_token", "message": NO_TOKEN, "field": "--token", "status": 401}
    if isinstance(exc, JobError):
        code = EXIT_NOT_MET if isinstance(exc, BudgetNotMetError) else EXIT_JOB
        return str(exc), code, {"code": exc.job.outcome, "message": str(exc), "field": None, "job": exc.job.id}
    if isinstance(exc, APIError):
        message, field = in_flags(exc.message), FLAGS.get(exc.field or "", exc.field)
        where = f" [{exc.status} {exc.code or ''}{', ' + field if field else ''}]"
        return message + where, EXIT_REFUSED, {"code": exc.code, "message": message, "field": field, "status": exc.status}
    message = in_flags(str(exc))
    code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower()  # network, client_argument
    return message, EXIT_REFUSED, {"code": code, "message": message, "field": None}


def handle_errors(command: F) -> F:
    """Typed SDK errors become a message on stderr (with `--json`: `{"error": {...}}` on stdout as
    well) and a non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        from ..client.errors import JobError, QuanttuneClientError

        try:
            return command(*args, **kwargs)
        except QuanttuneClientError as exc:
            token = kwargs.get("token") or os.environ.get("QUANTTUNE_TOKEN")
            message, code, body = _error(exc, token)
            if kwargs.get("as_json") and not isinstance(exc, JobError):  # a job error has printed the job
                _print_json({"error": body})
            raise _fail(escape(message), code) from None

    return wrapper  # type: ignore[return-value]


def _space(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        space = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--space") from None
    if not isinstance(space, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--space")
    return space


def _either(first: bool, second: bool, first_name: str, second_name: str, default: bool) -> bool:
    """A choice made by one of two flags (True: the first); giving both is a usage error."""
    if first and second:
        raise typer.BadParameter(f"give {first_name} or {second_name}, not both", param_hint=second_name)
    return True if first else False if second else default


def _finish_wait(job: Any, as_json: bool) -> None:
    """Wait with the progress bar (stderr), then print the job; exit 3 if it failed/was cancelled,
    4 if it finished without meeting its budget."""
    from ..client.errors import BudgetNotMetError, JobError
    from ..client.render import job_table

    try:
        info = job.wait(progress=True, raise_on_miss=True)
    except BudgetNotMetError as exc:
        if as_json:
            _print_json(_dump(exc.job))
        else:
            _console().print(job_table(exc.job))
        raise
    except JobError as exc:
        if as_json:
            _print_json(_dump(exc.job))
        raise
    except KeyboardInterrupt:
        raise _fail(f"interrupted; job {job.id} goes on: `quanttune wait {job.id}` follows it, "
                    f"`quanttune cancel {job.id}` stops it.", 130) from None
    if as_json:
        _print_json(_dump(info))
    else:
        _console().print(job_table(info))


@handle_errors
def submit(
    model: Annotated[str, typer.Argument(help="Factory reference 'module:callable', or a torch.export archive (.pt2).")],
    calibration: Annotated[str, typer.Option("--calibration", "-c", help="Reference returning batches, or a tensor file "
                                             "(safetensors / weights-only .pt: 'input' or 'input.N' or keyword names).")],
    evaluate: Annotated[str, typer.Option("--evaluate", "-e", help="Reference 'module:function' (takes the model, "
                                          "returns a float), or a built-in evaluator: top1 | agreement.")],
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Tensor file for the built-in evaluator "
                                                   "(top1: inputs + 'label').")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="State dict for the factory (safetensors or .pt).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Job name.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Batch size for uploaded tensors [default: 32].")] = None,
    max_drop: Annotated[float, typer.Option("--max-drop", min=0.0, help="Accuracy budget.")] = TuneOptions.max_drop,
    relative: Annotated[bool, typer.Option("--relative", help="The budget is a share of the FP32 baseline "
                                           "(the default: --max-drop 0.01 allows 1%).")] = False,
    absolute: Annotated[bool, typer.Option("--absolute", help="The budget is in the evaluation's own units.")] = False,
    higher_is_better: Annotated[bool, typer.Option("--higher-is-better", help="A higher score is better "
                                                   "(accuracy; the default).")] = False,
    lower_is_better: Annotated[bool, typer.Option("--lower-is-better", help="A lower score is better (a loss, "
                                                  "an error rate).")] = False,
    max_trials: Annotated[int | None, typer.Option("--max-trials", min=1, help="Most trials.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, help="Seconds of search.")] = TuneOptions.timeout,
    trial_timeout: Annotated[float | None, typer.Option("--trial-timeout", min=1, help="Seconds one evaluation may "
                                                        "take; a trial over it fails and the search goes on.")] = None,
    space: Annotated[str | None, typer.Option("--space", help="Search-space restriction as JSON, or @file.json.")] = None,
    parallelism: Annotated[int, typer.Option("--parallelism", min=1, help="Workers that may work on it at once.")] = 1,
    seed: Annotated[int, typer.Option("--seed", min=0)] = TuneOptions.seed,
    evaluate_on: Annotated[str, typer.Option("--evaluate-on", help="What each plan is scored on: onnxruntime (the "
                                             "deployed file) or simulation.")] = TuneOptions.evaluate_on,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job with a progress bar until it finishes (exit "
                                       "0 met the budget, 3 failed or cancelled, 4 budget not met).")] = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    request_timeout: RequestTimeout = 30.0,
) -> None:
    """Submit a tuning job (same inputs as `Client.submit`; uploads are files, never pickled)."""
    with _client(url, token, request_timeout) as client:
        job = client.submit(model, calibration, evaluate, eval_data=eval_data, weights=weights, name=name,
                            batch_size=batch_size, max_drop=max_drop,
                            relative=_either(relative, absolute, "--relative", "--absolute", TuneOptions.relative),
                            higher_is_better=_either(higher_is_better, lower_is_better, "--higher-is-better",
                                                     "--lower-is-better", TuneOptions.higher_is_better),
                            max_trials=max_trials, timeout=timeout,
                            trial_timeout=trial_timeout, space=_space(space), parallelism=parallelism, seed=seed,
                            evaluate_on=evaluate_on)
        if wait:
            if not as_json:
                print(f"submitted job {job.id} ({job.info.name})", file=sys.stderr)
            _finish_wait(job, as_json)
        elif as_json:
            _print_json(_dump(job.info))
        else:
            typer.echo(f"submitted job {job.id} ({job.info.name}): {job.info.status}; follow it with "
                       f"`quanttune wait {job.id}` or `quanttune status {job.id}`")


@handle_errors
def jobs(
    status: Annotated[str | None, typer.Option("--status", help="queued | running | succeeded | failed | cancelled")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    request_timeout: RequestTimeout = 30.0,
) -> None:
    """List your jobs, newest first."""
    from ..client.render import jobs_table

    with _client(url, token, request_timeout) as client:
        page = client.jobs_page(status, offset=offset, limit=limit)  # type: ignore[arg-type]
    if as_json:
        _print_json(_dump(page))
    elif not page.data:  # an empty table says nothing: say why there is none
        where = f" with status {status}" if status else ""
        typer.echo(f"no jobs{where} past the first {offset} (there are {page.count})" if offset and page.count
                   else f"no jobs{where}" + ("" if status else ": `quanttune submit` creates one"))
    else:
        _console().print(jobs_table(page.data, page.count))


@handle_errors
def status(job_id: JobId, as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None,
           request_timeout: RequestTimeout = 30.0) -> None:
    """A job's status, progress and outcome."""
    from ..client.render import job_table, print_deployment

    with _client(url, token, request_timeout) as client:
        info = client.job(job_id).info
    if as_json:
        _print_json(_dump(info))
        return
    console = _console()
    console.print(job_table(info))
    if info.deployment is not None:
        print_deployment(console, info.deployment)


@handle_errors
def trials(
    job_id: JobId,
    state: Annotated[str | None, typer.Option("--state", help="COMPLETE | FAIL | RUNNING | PRUNED")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Include each trial's full plan (JSON output).")] = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    request_timeout: RequestTimeout = 30.0,
) -> None:
    """A job's trials: plan summary, score, drop, INT8 coverage, state."""
    from ..client.render import trials_table

    with _client(url, token, request_timeout) as client:
        job = client.job(job_id)
        found = job.trials(state=state, include_plan=plan)
    if as_json:
        _print_json({"data": [_dump(t) for t in found], "count": len(found)})
    else:
        _console().print(trials_table(found, job.info.relative))


@handle_errors
def report(job_id: JobId, as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None,
           request_timeout: RequestTimeout = 30.0) -> None:
    """A succeeded job's report: figures and each layer's decision with its reason."""
    from ..client.render import ledger_table, print_deployment, report_summary

    with _client(url, token, request_timeout) as client:
        content = client.job(job_id).report()
    if as_json:
        _print_json(content)
        return
    console = _console()
    console.print(ledger_table(content))
    console.print(report_summary(content))
    print_deployment(console, content.get("deployment"))


@handle_errors
def download(
    job_id: JobId,
    directory: Annotated[Path, typer.Argument(help="Where to write model.onnx, plan.json, report.json.")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    request_timeout: RequestTimeout = 30.0,
) -> None:
    """Download a succeeded job's artifacts (SHA-256 checked)."""
    from ..client.render import artifacts_table

    with _client(url, token, request_timeout) as client:
        job = client.job(job_id)
        paths = job.download(directory)
        listed = job.artifacts()
    if as_json:
        _print_json({name: str(path) for name, path in paths.items()})
    else:
        _console().print(artifacts_table(listed, paths))


@handle_errors
def cancel(job_id: JobId, as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None,
           request_timeout: RequestTimeout = 30.0) -> None:
    """Cancel a queued or running job (workers stop before their next trial)."""
    with _client(url, token, request_timeout) as client:
        info = client.job(job_id).cancel()
    if as_json:
        _print_json(_dump(info))
    else:
        typer.echo(f"job {info.id} ({info.name}): {info.status}")


@handle_errors
def delete(job_id: JobId, as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None,
           request_timeout: RequestTimeout = 30.0) -> None:
    """Delete a finished, queued or cancelled job: its uploads, artifacts, study and trials (a running
    job is refused: `quanttune cancel` it first)."""
    with _client(url, token, request_timeout) as client:
        client.job(job_id).delete()
    if as_json:
        _print_json({"id": job_id, "deleted": True})
    else:
        typer.echo(f"job {job_id} deleted")


@handle_errors
def wait(job_id: JobId, as_json: JsonOption = False, url: UrlOption = None, token: TokenOption = None,
         request_timeout: RequestTimeout = 30.0) -> None:
    """Follow a job with a progress bar until it finishes (exit 0 met its budget, 3 failed or
    cancelled, 4 finished without meeting its budget)."""
    with _client(url, token, request_timeout) as client:
        _finish_wait(client.job(job_id), as_json)


def register(app: typer.Typer) -> None:
    """Add the client commands to `app`."""
    for command in (submit, jobs, status, trials, report, download, cancel, delete, wait):
        app.command(rich_help_panel="Client")(command)
