"""The live progress bar of `Job.wait(progress=True)` and the figure formatting shared with the
CLI and the demo (drops as the budget states them: relative in %, absolute as numbers)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..schemas import JobPublic

DASH = "–"


def fmt_score(value: float | None) -> str:
    return DASH if value is None else f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def fmt_drop(value: float | None, relative: bool) -> str:
    if value is None:
        return DASH
    return f"{value:.2%}" if relative else f"{value:.4g}"


def plural(n: int, word: str) -> str:
    """`1 trial`, `2 trials`, `0 trials`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_share(value: float | None) -> str:
    return DASH if value is None else f"{value:.0%}"


def budget_text(job: JobPublic) -> str:
    return f"{fmt_drop(job.max_drop, job.relative)} {'relative' if job.relative else 'absolute'}"


def outcome(job: JobPublic) -> tuple[float | None, float | None, float | None, bool | None]:
    """(score, drop, coverage, met): the final figures once the job succeeded (met: its `outcome`,
    which also counts the exported model on ONNX Runtime), else the best so far."""
    if job.status == "succeeded" and job.score is not None:
        return job.score, job.drop, job.coverage, job.outcome == "met"
    p = job.progress
    return p.best_score, p.best_drop, p.best_coverage, p.met


def progress_line(job: JobPublic) -> str:
    """`best 97.78 (FP32 97.78) · drop 0.00% of 1.00% ✓ · INT8 MACs 100% · 3 evals` (rich markup)."""
    score, drop, coverage, met = outcome(job)
    mark = "" if met is None else " [green]✓[/]" if met else " [red]✗[/]"
    baseline = f" (FP32 {fmt_score(job.baseline)})" if job.baseline is not None else ""
    return (f"best {fmt_score(score)}{baseline} · drop {fmt_drop(drop, job.relative)} of "
            f"{fmt_drop(job.max_drop, job.relative)}{mark} · INT8 MACs {fmt_share(coverage)} · "
            f"{plural(job.progress.evaluations, 'eval')}")


def trials_text(job: JobPublic) -> str:
    done = job.progress.trials
    return f"{done}/{plural(job.max_trials, 'trial')}" if job.max_trials else plural(done, "trial")


STATUS_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}
OUTCOME_STYLE = {"met": "green", "not_met": "dark_orange", "failed": "red", "cancelled": "magenta"}


def outcome_text(job: JobPublic) -> str:
    """The job's outcome in rich markup: `MET`, `NOT MET` (warning colour), `failed`, `cancelled`;
    while it runs, whether the best plan so far meets the budget."""
    if job.outcome is None:
        met = job.progress.met
        return "–" if met is None else f"[dim]so far {'met' if met else 'not met'}[/]"
    label = {"met": "MET", "not_met": "NOT MET"}.get(job.outcome, job.outcome)
    return f"[{OUTCOME_STYLE[job.outcome]}]{label}[/]"


class _TwoLineProgress(Progress):
    """A progress bar line per task, and under it the task's `line` field (the figures)."""

    def get_renderables(self):  # noqa: ANN201
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            yield Text.from_markup("  " + task.fields.get("line", ""))


class JobProgress:
    """A rich progress bar following one job: trials done (of max_trials) and elapsed time, and
    under it the best score, drop vs budget, INT8 coverage and evaluations used. Use as a context
    manager and call `update(job)` with each fresh `JobPublic`."""

    def __init__(self, console: Console | None = None, *, transient: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self._progress = _TwoLineProgress(
            SpinnerColumn(finished_text="•"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[trials]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=transient,
        )
        self._task: Any = None

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, job: JobPublic) -> None:
        style = STATUS_STYLE.get(job.status, "white")
        description = f"[bold]job {job.id}[/] [{style}]{job.status}[/]"
        finished = job.status in ("succeeded", "failed", "cancelled")
        done = job.progress.trials
        total: int | None = job.max_trials  # None: no trial limit, the bar pulses
        if job.status == "succeeded" or (finished and total is None):
            total = max(done, 1)  # a finished search fills its bar
        fields = {"trials": trials_text(job), "line": progress_line(job)}
        if self._task is None:
            self._task = self._progress.add_task(description, total=total, **fields)
        self._progress.update(self._task, description=description, total=total, completed=done, **fields)
        if finished:
            self._progress.stop_task(self._task)
