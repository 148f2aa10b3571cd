"""`quanttune demo`: tune the bundled example end to end with the library and show the result."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .cli import app


@app.command()
def demo(
    out: Path = typer.Option(Path("quanttune-demo"), help="Where to write model.onnx, plan.json, report.json."),
    max_drop: float = typer.Option(0.01, help="Accuracy budget: largest relative drop allowed."),
) -> None:
    """Tune the bundled digits CNN (its naive INT8 breaks a 1% budget) and print the per-layer report."""
    from tuner import LayerConfig, apply_plan, tune
    from tuner.examples import digits

    console = Console()
    console.print("[bold]quanttune demo[/]: a CNN on scikit-learn's digits with one outlier channel")
    start = time.perf_counter()
    model = digits.build_model()
    batches = digits.calibration_data()
    console.print(f"trained the example in {time.perf_counter() - start:.1f}s")
    result = tune(model, batches, digits.evaluate, max_drop=max_drop)
    naive = digits.evaluate(apply_plan(model, result.calibration.uniform_plan(LayerConfig(weights="per_tensor")),
                                       result.calibration))

    table = Table(title="Per-layer decisions (SQNR: layer output signal-to-noise in INT8, from calibration data)")
    for column in ("layer", "MACs", "decision", "best SQNR dB", "why"):
        table.add_column(column, overflow="fold")
    for name, entry in result.ledger.items():
        table.add_row(name, f"{entry['macs_share']:.1%}", entry["decision"],
                      f"{entry['best_sqnr_db']:.1f}", entry["reason"])
    console.print(table)
    paths = result.save(out)
    cov = result.coverage
    console.print(
        f"FP32 accuracy {result.baseline:.2f}%  |  naive INT8 (per-tensor max) {naive:.2f}%  |  "
        f"tuned INT8 simulated {result.score:.2f}%, on ONNX Runtime {result.deployed_score:.2f}%\n"
        f"drop {result.drop:.2%} (budget {max_drop:.2%}): {'MET' if result.met else 'NOT MET'}  |  "
        f"INT8 layers {len(result.int8_layers)}/{len(result.plan.layers)}, MACs in INT8 {cov['macs']:.0%}, "
        f"size {cov['int8_bytes'] / 1024:.0f} KiB vs {cov['fp32_bytes'] / 1024:.0f} KiB FP32  |  "
        f"evaluations {result.evaluations}"
    )
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if not result.met:
        raise typer.Exit(1)
