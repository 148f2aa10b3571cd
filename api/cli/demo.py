"""`quanttune demo`: the whole service on one machine, end to end, in about a minute.

It starts the embedded server (`quanttune serve`: SQLite and artifacts under `<out>/server`, a free
port, one worker, a token), submits the bundled conv-heavy digits CNN (`tuner.examples.digits_cnn`:
enough convolution that INT8 is faster than FP32 on ONNX Runtime even at batch 1) through the SDK as a user would (the
nn.Module exported with torch.export, calibration batches uploaded as safetensors, the evaluation
by reference), follows it with the progress bar, prints the outcome and each layer's decision with
its reason, what ONNX Runtime runs and how fast against FP32 (the worker's deployed check), writes
model.onnx, plan.json and report.json to `<out>`, and stops the server. The dashboard URL is
printed as soon as the server is up, while the job runs (`--keep-serving`: again at the end).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from tuner.options import TuneOptions


EVALUATE = "tuner.examples.digits_cnn:evaluate"


class _Local:
    """Client-side figures computed while the server works: the naive INT8 accuracy."""

    def __init__(self, model: Any, batches: list[Any]) -> None:
        self.model, self.batches = model, batches
        self.naive: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="demo-local", daemon=True)

    def _run(self) -> None:
        try:
            from tuner import LayerConfig, apply_plan, calibrate
            from tuner.examples import digits_cnn

            calibration = calibrate(self.model, self.batches)
            naive_plan = calibration.uniform_plan(LayerConfig(weights="per_tensor"))
            self.naive = digits_cnn.evaluate(apply_plan(self.model, naive_plan, calibration))
        except BaseException as exc:  # reported, never fatal: the figure is an extra
            self.error = exc


def demo(
    out: Path = typer.Option(Path("quanttune-demo"), help="Where to write model.onnx, plan.json, report.json "
                             "(the server's database and artifacts go to <out>/server)."),
    max_drop: float = typer.Option(TuneOptions.max_drop, help="Accuracy budget: largest relative drop allowed."),
    port: int = typer.Option(0, help="Port of the embedded server (0: a free one)."),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="Keep the server (and its dashboard) running "
                                      "after the demo, until Ctrl-C."),
) -> None:
    """Start the embedded server, tune the bundled conv-heavy digits CNN through the SDK (its naive
    INT8 breaks a 1% budget), print the per-layer decisions and the INT8 speed-up on ONNX Runtime,
    write the results."""
    from rich.markup import escape

    from ..client.errors import QuanttuneClientError
    from ..client.render import ledger_table, report_summary
    from .embedded import EmbeddedServer, EmbeddedServerError

    console = Console(highlight=False)
    console.print("[bold]quanttune demo[/]: the service on this machine, a conv-heavy CNN on scikit-learn's "
                  "digits (upsampled to 32x32) with one outlier channel")
    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(out / "server", port=port)
    server.start()
    try:
        report, paths, local = _tune(console, server, started, max_drop)
        console.print(ledger_table(report))
        console.print(report_summary(report))
        _results(console, report, paths, local)
        written = [str(paths[n]) for n in sorted(paths)]
        console.print(f"wrote {', '.join(written)}  ({time.perf_counter() - started:.0f}s in all)")
        if keep_serving:
            console.print(f"dashboard: {server.url}/dashboard/  (token: {server.token})")
            _serve_until_interrupted(console, server)
    except (QuanttuneClientError, EmbeddedServerError) as exc:
        console.print(f"[red]demo failed:[/] {escape(str(exc))}\n--- server log ({server.log_path}) ---\n"
                      f"{escape(server.log_tail())}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    finally:
        code = server.stop()
        console.print(f"server stopped (exit code {code}); to browse the results again, run quanttune serve "
                      f"--data-dir {server.data_dir} --port {server.port} and log in to its dashboard with the "
                      f"token in {server.data_dir / 'demo-token'}")
    if not report.get("met"):
        raise typer.Exit(1)


def _tune(console: Console, server: Any, started: float, max_drop: float) -> tuple[dict[str, Any], dict[str, Path], _Local]:
    """Train the example while the server starts, submit it through the SDK, follow it; the report,
    the downloaded artifacts and the local figures."""
    import torch

    from tuner.examples import digits_cnn

    from ..client import Client

    torch.set_num_threads(1)  # this process shares the CPUs with the server it started (measured: faster)
    console.print(f"starting the server (quanttune serve, 1 worker, {server.db_url}) while the example trains")
    model, batches = digits_cnn.build_model(), digits_cnn.calibration_data()
    console.print(f"trained the example in {time.perf_counter() - started:.1f}s")
    server.wait_ready()
    console.print(f"server up on {server.url} after {time.perf_counter() - started:.1f}s")
    console.print(f"dashboard: {server.url}/dashboard/  (token: {server.token}): watch the job live; the server stops "
                  "when the demo ends (--keep-serving keeps it)")
    local = _Local(model, batches)
    with Client(server.url, server.token) as client:
        job = client.submit(model, batches, EVALUATE, name="digits demo", max_drop=max_drop)
        console.print(f"submitted job {job.id}: the model as a torch.export archive, {len(batches)} calibration "
                      f"batches as safetensors, evaluation {EVALUATE}")
        local.thread.start()
        job.wait(progress=console)
        report = job.report()
        paths = job.download(Path(server.data_dir).parent)
    local.thread.join()
    return report, paths, local


def _serve_until_interrupted(console: Console, server: Any) -> None:
    console.print("serving until Ctrl-C ...")
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def _results(console: Console, report: dict[str, Any], paths: dict[str, Path], local: _Local) -> None:
    """The demo's extras: naive INT8 accuracy, the downloaded model evaluated here, and the latency
    table of the deployed check the worker made (INT8 vs FP32 on ONNX Runtime, timed in turns)."""
    from tuner import load_onnx
    from tuner.examples import digits_cnn

    from ..client.render import print_deployment, score_source

    deployed = digits_cnn.evaluate(load_onnx(paths["model.onnx"]))
    naive = f"{local.naive:.2f}%" if local.naive is not None else f"not measured ({type(local.error).__name__})"
    console.print(f"FP32 accuracy {report['baseline']:.2f}%  |  naive INT8 (per-tensor max) {naive}  |  tuned INT8 "
                  f"{report['score']:.2f}% {score_source(report.get('deployment'))}, downloaded model.onnx on ONNX "
                  f"Runtime here {deployed:.2f}%")
    if report.get("deployment"):  # kernels and speed-ups are in the summary above; the timings per setting here
        print_deployment(console, report["deployment"])
    else:
        console.print("[yellow]the deployed check did not run: no ONNX Runtime figures in the report[/]")
    coverage = report.get("coverage") or {}
    if coverage.get("fp32_bytes"):
        console.print(f"file size: model.onnx {paths['model.onnx'].stat().st_size / 1024:.0f} KiB; weights "
                      f"{coverage['int8_bytes'] / 1024:.0f} KiB vs {coverage['fp32_bytes'] / 1024:.0f} KiB in FP32")


def register(app: typer.Typer) -> None:
    """Add `demo` to `app`."""
    app.command()(demo)
