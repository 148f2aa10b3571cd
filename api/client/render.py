"""Rich tables of jobs, trials and reports, for the CLI and the demo (pure: data in, renderables out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.table import Table

from ..schemas import ArtifactPublic, DeploymentPublic, JobPublic, TrialPublic
from .progress import (
    STATUS_STYLE,
    budget_text,
    fmt_drop,
    fmt_score,
    fmt_share,
    outcome,
    outcome_text,
    plural,
    progress_line,
)

TRIAL_STYLE = {"COMPLETE": "green", "FAIL": "red", "RUNNING": "cyan", "PRUNED": "dim", "WAITING": "yellow"}


def _when(value: datetime | None) -> str:
    return "–" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def jobs_table(jobs: list[JobPublic], count: int | None = None) -> Table:
    caption = f"{len(jobs)} of {plural(count, 'job')}" if count is not None and count != len(jobs) else None
    table = Table(title="jobs", caption=caption)
    for column in ("id", "name", "status", "outcome", "trials", "score", "drop", "INT8 MACs", "created"):
        table.add_column(column, justify="right" if column in ("id", "trials", "score", "drop", "INT8 MACs") else "left")
    for job in jobs:
        score, drop, coverage, _ = outcome(job)
        table.add_row(str(job.id), job.name, _status(job.status), outcome_text(job), str(job.progress.trials),
                      fmt_score(score), fmt_drop(drop, job.relative), fmt_share(coverage), _when(job.created_at))
    return table


def job_table(job: JobPublic) -> Table:
    """One job, field by field: what was submitted, progress, outcome."""
    table = Table(title=f"job {job.id}: {job.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = [
        ("status", _status(job.status) + (f" ({plural(job.workers, 'worker')})" if job.workers else "")),
        ("outcome", outcome_text(job)),
        ("model", job.model_source),
        ("calibration", job.calibration_source),
        ("evaluation", job.evaluation_source),
        ("budget", f"drop ≤ {budget_text(job)}, {'higher' if job.higher_is_better else 'lower'} is better"),
        ("limits", f"max_trials {job.max_trials or '–'}, timeout {job.timeout or '–'} s, parallelism {job.parallelism}"),
        ("progress", f"{plural(job.progress.trials, 'trial')}: {progress_line(job)}"),
    ]
    if job.status == "succeeded":
        source = score_source(job.deployment)
        rows += [
            ("baseline (FP32)", fmt_score(job.baseline)),
            ("score (INT8)", _score_text(job.score, job.deployed_score, source)),
            ("drop", f"{fmt_drop(job.drop, job.relative)} {source}"
                     + (f", {fmt_drop(job.deployed_drop, job.relative)} on ONNX Runtime"
                        if job.deployed_drop is not None and source == "simulated" else "")
                     + f" (budget {budget_text(job)}): {outcome_text(job)}"),
            ("INT8 MACs", fmt_share(job.coverage)),
        ]
        if job.deployment is not None:
            rows += [("INT8 kernels", kernels_line(deployment_summary(job.deployment))),
                     ("speed-up vs FP32", speedup_line(deployment_summary(job.deployment)))]
        rows.append(("artifacts", ", ".join(job.artifacts) or "–"))
    if job.reason:
        rows.append(("reason", job.reason))
    if job.error:
        rows.append(("error", f"[red]{job.error}[/]"))
    rows += [("created", _when(job.created_at)), ("started", _when(job.started_at)), ("finished", _when(job.finished_at))]
    for key, value in rows:
        table.add_row(key, value)
    return table


def trials_table(trials: list[TrialPublic], relative: bool = True) -> Table:
    table = Table(title="trials")
    for column in ("#", "state", "score", "drop", "INT8 MACs", "FP32 layers", "plan", "s", "note"):
        table.add_column(column, justify="right" if column in ("#", "score", "drop", "INT8 MACs", "s") else "left",
                         overflow="fold")
    for t in trials:
        note = f"repeats #{t.duplicate_of}" if t.duplicate_of is not None else (t.error or "")
        table.add_row(str(t.number), f"[{TRIAL_STYLE.get(t.state, 'white')}]{t.state}[/]", fmt_score(t.score),
                      fmt_drop(t.drop, relative), fmt_share(t.coverage), ", ".join(t.fp32_layers) or "–",
                      t.summary or "–", "–" if t.duration_s is None else f"{t.duration_s:.2f}", note)
    return table


def ledger_table(report: dict[str, Any]) -> Table:
    """Per layer of a report: share of MACs, INT8 or FP32 with which setting, and why; and what
    ONNX Runtime runs for it (its kernel, from the deployed check)."""
    table = Table(title="per-layer decisions (SQNR: layer output signal-to-noise in INT8, from calibration data)")
    for column in ("layer", "MACs", "decision", "best SQNR dB", "why", "ONNX Runtime runs"):
        table.add_column(column, overflow="fold")
    kernels = ((report.get("deployment") or {}).get("kernels") or {}).get("layers") or {}
    for name, entry in (report.get("ledger") or {}).items():
        decision = str(entry.get("decision", "–"))
        style = "green" if decision.startswith("int8") else "yellow"
        sqnr = entry.get("best_sqnr_db")
        table.add_row(name, fmt_share(entry.get("macs_share")) if entry.get("macs_share") is not None else "–",
                      f"[{style}]{decision}[/]", "–" if sqnr is None else f"{sqnr:.1f}", str(entry.get("reason", "")),
                      _runs_as(kernels.get(name)))
    return table


def _runs_as(kernel: dict[str, Any] | None) -> str:
    if not kernel or kernel.get("planned") != "int8":
        return "–"
    if kernel.get("int8"):
        return f"[green]{kernel.get('kernel')} (INT8)[/]"
    return f"[red]{kernel.get('kernel') or '?'} (float)[/]"


def _score_text(score: float | None, deployed: float | None, source: str) -> str:
    if source == "on ONNX Runtime":  # the search scored the deployed file: one figure
        return f"{fmt_score(score)} on ONNX Runtime (the file the search scored)"
    return f"{fmt_score(score)} simulated, {fmt_score(deployed)} on ONNX Runtime"


def score_source(deployment: DeploymentPublic | dict[str, Any] | None) -> str:
    """What the search's score was measured on: the deployed file on ONNX Runtime (plans are scored
    there by default, `deployment.scored_by == "search"`) or the PyTorch simulation."""
    summary = deployment_summary(deployment) or {}
    return "on ONNX Runtime" if summary.get("scored_by") == "search" else "simulated"


def deployment_summary(deployment: DeploymentPublic | dict[str, Any] | None) -> dict[str, Any] | None:
    """The deployed check in the job's shape (`DeploymentPublic`), from a job or from report.json."""
    if deployment is None or isinstance(deployment, DeploymentPublic):
        return deployment.model_dump() if deployment is not None else None
    if "int8_kernels" in deployment:
        return deployment
    kernels, latency = deployment.get("kernels") or {}, deployment.get("latency") or {}
    layers = kernels.get("layers") or {}
    return {
        "int8_layers": kernels.get("planned_int8"), "int8_kernels": kernels.get("running_int8"),
        "int8_macs_planned": kernels.get("int8_macs_planned"), "int8_macs_running": kernels.get("int8_macs_running"),
        "float_layers": [{"layer": n, **{k: layers.get(n, {}).get(k) for k in ("kernel", "reason")}}
                         for n in kernels.get("running_float") or []],
        "calibration_batch": latency.get("calibration_batch"), "latency": latency.get("rows") or [],
        "errors": deployment.get("errors") or {}, "scored_by": deployment.get("scored_by"),
    }


def kernels_line(summary: dict[str, Any] | None) -> str:
    """e.g. `4/4 planned INT8 layers run INT8 kernels (100% of MACs run INT8)`."""
    if not summary or summary.get("int8_kernels") is None:
        return "not checked" + (f": {summary['errors']['kernels']}" if summary and "kernels" in summary["errors"] else "")
    ok = summary["int8_kernels"] == summary["int8_layers"]
    return (f"[{'green' if ok else 'red'}]{summary['int8_kernels']}/{summary['int8_layers']}[/] planned INT8 layers "
            f"run INT8 kernels ({fmt_share(summary.get('int8_macs_running'))} of MACs run INT8)")


def speedup_line(summary: dict[str, Any] | None) -> str:
    """INT8 vs FP32 on ONNX Runtime at each batch size and thread setting measured."""
    rows = (summary or {}).get("latency") or []
    if not rows:
        return "not measured" + (f": {summary['errors']['latency']}" if summary and "latency" in summary["errors"] else "")
    return ", ".join(f"[{'green' if r['speedup'] >= 1 else 'red'}]{r['speedup']:.2f}x[/] at batch {r['batch']} "
                     f"({_threads(r['threads'])})" for r in rows)


def _threads(threads: int | str) -> str:
    return "1 thread" if threads == 1 else f"{threads} threads"


def deployment_table(deployment: DeploymentPublic | dict[str, Any] | None) -> Table | None:
    """Deployed on ONNX Runtime: INT8 kernels x/y, and FP32 vs INT8 latency per batch size and threads."""
    summary = deployment_summary(deployment)
    if summary is None:
        return None
    caption = None
    if summary.get("int8_kernels") is not None:
        caption = (f"INT8 kernels {summary['int8_kernels']}/{summary['int8_layers']} layers, "
                   f"{fmt_share(summary.get('int8_macs_running'))} of MACs run INT8")
    table = Table(title="deployed on ONNX Runtime (CPU)", caption=caption)
    for column in ("batch", "threads", "FP32 ms", "INT8 ms", "speed-up"):
        table.add_column(column, justify="left" if column == "threads" else "right")
    for r in summary.get("latency") or []:
        style = "green" if r["speedup"] >= 1 else "red"
        table.add_row(str(r["batch"]), str(r["threads"]), f"{r['fp32_ms']:.3f}", f"{r['int8_ms']:.3f}",
                      f"[{style}]{r['speedup']:.2f}x[/]")
    return table


def deployment_notes(deployment: DeploymentPublic | dict[str, Any] | None) -> str:
    """The planned INT8 layers that run in float (and why), and what could not be measured."""
    summary = deployment_summary(deployment) or {}
    lines = [f"[red]runs in float:[/] {f['layer']}: {f['reason']}" for f in summary.get("float_layers") or []]
    lines += [f"[yellow]not measured ({part}):[/] {error}" for part, error in (summary.get("errors") or {}).items()]
    return "\n".join(lines)


def print_deployment(console: Any, deployment: DeploymentPublic | dict[str, Any] | None) -> None:
    """The deployed check's table and notes on a rich console (nothing when there is none)."""
    if deployment:
        console.print(deployment_table(deployment))
        if notes := deployment_notes(deployment):
            console.print(notes)


def report_summary(report: dict[str, Any]) -> str:
    """The figures of a report.json in a few lines (rich markup)."""
    budget = report.get("budget") or {}
    relative = bool(budget.get("relative", True))
    cov = report.get("coverage") or {}
    int8, fp32 = report.get("int8_layers") or [], report.get("fp32_layers") or []
    size = (f", size {cov['int8_bytes'] / 1024:.0f} KiB vs {cov['fp32_bytes'] / 1024:.0f} KiB FP32"
            if cov.get("int8_bytes") and cov.get("fp32_bytes") else "")
    source = score_source(report.get("deployment"))
    lines = [
        f"FP32 baseline {fmt_score(report.get('baseline'))}  |  INT8 "
        + _score_text(report.get("score"), report.get("deployed_score"), source),
        f"drop {fmt_drop(report.get('drop'), relative)} {source} (budget {fmt_drop(budget.get('max_drop'), relative)} "
        f"{'relative' if relative else 'absolute'}"
        + (f", {fmt_drop(report['deployed_drop'], relative)} on ONNX Runtime"
           if report.get("deployed_drop") is not None and source == "simulated" else "")
        + f"): {'[green]MET[/]' if _report_met(report) else '[dark_orange]NOT MET[/]'}",
        f"INT8 layers {len(int8)}/{len(int8) + len(fp32)}: MACs in INT8 {fmt_share(cov.get('macs'))}{size}"
        + (f"  |  FP32: {', '.join(fp32)}" if fp32 else ""),
        f"evaluations {report.get('evaluations')}  |  trials {len(report.get('trials') or [])}",
    ]
    if report.get("deployment"):
        summary = deployment_summary(report["deployment"])
        lines += [f"ONNX Runtime: {kernels_line(summary)}", f"INT8 vs FP32 on ONNX Runtime: {speedup_line(summary)}"]
    if report.get("reason"):
        lines.append(f"reason: {report['reason']}")
    return "\n".join(lines)


def _report_met(report: dict[str, Any]) -> bool:
    """As the job's outcome: the best plan met the budget, and so did the exported model on ONNX
    Runtime where it was evaluated."""
    deployed, budget = report.get("deployed_drop"), (report.get("budget") or {}).get("max_drop")
    return bool(report.get("met")) and (deployed is None or budget is None or deployed <= budget)


def artifacts_table(artifacts: list[ArtifactPublic], paths: dict[str, Any] | None = None) -> Table:
    table = Table(title="artifacts")
    for column in ("name", "bytes", "sha256", *(("written to",) if paths else ())):
        table.add_column(column, justify="right" if column == "bytes" else "left", overflow="fold")
    for a in artifacts:
        row = [a.name, str(a.size), a.sha256[:16]]
        if paths:
            row.append(str(paths.get(a.name, "–")))
        table.add_row(*row)
    return table
