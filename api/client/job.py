"""`Job`: one submitted job, seen through the REST API (docs/api.md). Made by `Client.submit`,
`Client.job` and `Client.jobs`, on the client's connection (`Transport`); every method is one or
a few HTTP requests."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..schemas import (
    FINISHED_STATUSES,
    ArtifactPublic,
    ArtifactsPublic,
    JobPublic,
    LedgerPublic,
    TrialPublic,
    TrialsPublic,
)
from .errors import BudgetNotMetError, JobCancelledError, JobFailedError, NetworkError, WaitTimeoutError
from .progress import fmt_drop

if TYPE_CHECKING:
    from rich.console import Console

    from .transport import Transport


class Job:
    """A job on the server. `info` is the last `JobPublic` fetched (refreshed by `status()`)."""

    def __init__(self, http: Transport, info: JobPublic) -> None:
        self.http = http  # the `Client`'s connection
        self.info = info

    @property
    def id(self) -> int:
        return self.info.id

    def __repr__(self) -> str:
        return f"Job(id={self.id}, name={self.info.name!r}, status={self.info.status!r})"

    # -- reading -----------------------------------------------------------------------------------
    def status(self) -> JobPublic:
        """Fetch the job: status, progress and (once finished) the outcome."""
        self.info = JobPublic.model_validate(self.http.get(f"/jobs/{self.id}").json())
        return self.info

    def trials(self, *, state: str | None = None, include_plan: bool = False) -> list[TrialPublic]:
        """Every trial of the job's study in trial-number order (all pages)."""
        found: list[TrialPublic] = []
        while True:
            params: dict[str, Any] = {"offset": len(found), "limit": 1000, "include_plan": include_plan}
            if state is not None:
                params["state"] = state
            page = TrialsPublic.model_validate(self.http.get(f"/jobs/{self.id}/trials", params=params).json())
            found.extend(page.data)
            if not page.data or len(found) >= page.count:
                return found

    def ledger(self) -> LedgerPublic:
        """Layer names, and the per-layer ledger (decision and reason) once the job succeeded."""
        return LedgerPublic.model_validate(self.http.get(f"/jobs/{self.id}/ledger").json())

    def report(self) -> dict[str, Any]:
        """The job's report.json (figures, plan, per-layer ledger, trials); `ConflictError` until
        the job succeeded."""
        return self.http.get(f"/jobs/{self.id}/report").json()

    def artifacts(self) -> list[ArtifactPublic]:
        return ArtifactsPublic.model_validate(self.http.get(f"/jobs/{self.id}/artifacts").json()).data

    # -- acting ------------------------------------------------------------------------------------
    def cancel(self) -> JobPublic:
        """Cancel the job (workers stop before their next trial). `ConflictError` if it already
        succeeded or failed; cancelling a cancelled job does nothing."""
        self.info = JobPublic.model_validate(self.http.request("POST", f"/jobs/{self.id}/cancel", idempotent=True).json())
        return self.info

    def delete(self) -> None:
        """Delete the job, its uploads, artifacts and trials; `ConflictError` while it is running (cancel it first)."""
        self.http.request("DELETE", f"/jobs/{self.id}", idempotent=True)

    def wait(self, progress: bool | Console = True, *, timeout: float | None = None, poll: float = 1.0,
             raise_on_miss: bool = False) -> JobPublic:
        """Poll until the job finishes and return its final `JobPublic` when it succeeded: check its
        `outcome` ('met' or 'not_met': a succeeded job may have missed its budget).

        `progress`: show a live rich progress bar (on stderr; or on the given rich Console).
        Raises `JobFailedError` (message: the server's reason) or `JobCancelledError`, and
        `WaitTimeoutError` when `timeout` seconds pass first (the job keeps running). With
        `raise_on_miss=True`, a job that succeeded without meeting its budget raises
        `BudgetNotMetError` (its `.job` is the final `JobPublic`) instead of returning."""
        deadline = None if timeout is None else time.monotonic() + timeout
        display = None
        if progress:
            from rich.console import Console

            from .progress import JobProgress

            display = JobProgress(progress if isinstance(progress, Console) else None)
            display.__enter__()
        try:
            while True:
                info = self.status()
                if display is not None:
                    display.update(info)
                if info.status in FINISHED_STATUSES:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeoutError(f"job {self.id} is still {info.status} after {timeout}s.")
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        finally:
            if display is not None:
                display.__exit__(None, None, None)
        if info.status == "failed":
            raise JobFailedError(f"job {self.id} failed: {info.error or 'no reason given'}", info)
        if info.status == "cancelled":
            raise JobCancelledError(f"job {self.id} was cancelled.", info)
        if raise_on_miss and info.outcome == "not_met":
            raise BudgetNotMetError(not_met_message(info), info)
        return info

    # -- results -----------------------------------------------------------------------------------
    def download(self, directory: str | Path, names: list[str] | None = None) -> dict[str, Path]:
        """Download the artifacts (`model.onnx`, `plan.json`, `report.json`, or `names`) into
        `directory`; each file's SHA-256 is checked against the server's listing."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        listed = {a.name: a for a in self.artifacts()}
        # nothing listed (the job has not succeeded): asking for the model makes the server say why
        wanted = (list(listed) or ["model.onnx"]) if names is None else names
        paths: dict[str, Path] = {}
        for name in wanted:
            paths[name] = self._download_one(name, directory, listed.get(name))
        return paths

    def _download_one(self, name: str, directory: Path, listed: ArtifactPublic | None) -> Path:
        target = directory / Path(name).name
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with self.http.stream("GET", f"/jobs/{self.id}/artifacts/{name}") as response, open(partial, "wb") as out:
            for chunk in response.iter_bytes():
                digest.update(chunk)
                out.write(chunk)
        if listed is not None and digest.hexdigest() != listed.sha256:
            partial.unlink(missing_ok=True)
            raise NetworkError(f"{name}: the download's SHA-256 does not match the server's listing (truncated?).")
        partial.replace(target)
        return target

    def load_model(self, directory: str | Path | None = None, *, threads: int | None = None) -> Any:
        """The job's INT8 model on ONNX Runtime (`tuner.load_onnx`), called like the original model.
        `model.onnx` is downloaded into `directory` (kept), or a temporary one (removed once loaded)."""
        from tuner.onnx_runtime import load_onnx

        if directory is not None:
            return load_onnx(self.download(directory, ["model.onnx"])["model.onnx"], threads=threads)
        with tempfile.TemporaryDirectory(prefix=f"quanttune-job-{self.id}-") as tmp:
            return load_onnx(self.download(tmp, ["model.onnx"])["model.onnx"], threads=threads)


def not_met_message(info: JobPublic) -> str:
    """Why a succeeded job's outcome is 'not_met', in one line."""
    budget = f"{fmt_drop(info.max_drop, info.relative)} {'relative' if info.relative else 'absolute'}"
    if info.met and info.deployed_drop is not None:
        why = (f"the exported model's drop on ONNX Runtime is {fmt_drop(info.deployed_drop, info.relative)} "
               f"(simulated {fmt_drop(info.drop, info.relative)})")
    else:
        why = f"the best plan's drop is {fmt_drop(info.drop, info.relative)}"
    return (f"job {info.id} finished without meeting its budget: {why}, over the {budget} budget"
            + (f"; {info.reason}" if info.reason else "") + ".")
