"""Issue 15 figures: a job's wall time, evaluations and INT8 coverage with 1, 2 and 4 workers.

    python benchmarks/bench_parallel.py                       # SQLite and PostgreSQL, 1/2/4 workers
    python benchmarks/bench_parallel.py --db sqlite --workers 1 4 --eval-cost 2

A real `quanttune serve --workers N` (worker processes) on SQLite, or on a PostgreSQL server the
script starts in a temporary directory (Debian's postgresql; as root it runs as `postgres`). The
job is the digits CNN (`tuner.examples.digits`) with `parallelism=N` and an evaluation that
sleeps `--eval-cost` seconds before computing the metric: the evaluation stands for a costly
one that runs elsewhere (an accelerator, a data set on another machine), so its cost does not
use the shared cores. Two cases:

- `fallback`: the search space restricted to naive settings (per-tensor max ranges and weights,
  affine, no SmoothQuant), so the full-INT8 plan misses the 1% budget and layers must fall back;
- `no-fallback`: the default space, where the first plan meets the budget.

Each server first runs one untimed warm-up job in which each worker that evaluates trains the
digits model and exports a plan to ONNX once (a process's first torch.onnx export costs several
seconds more: a long-running worker has paid it; "workers warmed" says how many did), then the
timed job. Printed per run: wall time (the job's
created_at -> finished_at, server clock), evaluations (every call of the evaluation by every
worker: baseline, plans, the final ONNX Runtime check), trials, INT8 coverage (share of MACs),
whether the budget was met, and the trials each worker ran.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy
from bench_load import Server  # noqa: E402

NAIVE = {"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False}
CASES = {"fallback": NAIVE, "no-fallback": None}
EVAL_MODULE = '''
import os, time
from tuner.examples import digits

def evaluate(model):
    time.sleep(float(os.environ.get("QT_BENCH_EVAL_COST", "2")))
    return digits.evaluate(model)

_warm = []

def warm_evaluate(model):
    # the warm-up job: each worker process exports a plan to ONNX once (a process's first
    # torch.onnx export is several seconds slower), as a long-running worker has
    if not _warm:
        import tempfile
        from tuner import calibrate, export_onnx
        fp32 = digits.build_model()
        calibration = calibrate(fp32, digits.calibration_data())
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(fp32, calibration.uniform_plan(), calibration, tmp + "/warm.onnx")
        _warm.append(True)
    return evaluate(model)
'''


class Postgres:
    """A throwaway PostgreSQL server (like the tests' fixture)."""

    def __enter__(self) -> Postgres:
        from api.cli.embedded import free_port

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if not found:
            raise SystemExit("PostgreSQL binaries not found: apt-get install -y postgresql")
        self.bindir = Path(found[-1]).parent
        self.base = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
        self.base.chmod(0o755)
        self.port = free_port()
        self.run("initdb", "-D", str(self.base / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c max_connections=300")
        self.run("pg_ctl", "-D", str(self.base / "data"), "-l", str(self.base / "log"), "-o", options, "-w", "start")
        return self

    def run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bindir / tool), *args], check=True, capture_output=True)

    def database(self) -> str:
        import psycopg

        name = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc: object) -> None:
        subprocess.run([*self.as_postgres, str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m",
                        "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def submit(client, name: str, space: dict | None, parallelism: int, evaluate: str = "evaluate") -> int:  # noqa: ANN001
    spec = {"name": name, "model": "tuner.examples.digits:build_model",
            "calibration": "tuner.examples.digits:calibration_data", "evaluate": f"qt_bench:{evaluate}",
            "max_drop": 0.01, "max_trials": 30, "parallelism": parallelism, **({"space": space} if space else {})}
    response = client.post("/v1/jobs", files={"spec": (None, json.dumps(spec))})
    response.raise_for_status()
    return response.json()["id"]


def wait(client, job_id: int, timeout: float = 900) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise SystemExit(f"job {job_id} did not finish in {timeout}s")


def seconds(job: dict) -> float:
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(job["finished_at"]) - parse(job["created_at"])).total_seconds()


def run(root: Path, db: str | None, case: str, workers: int) -> dict:
    with Server(root, db, workers) as server, server.client() as client:
        warm = wait(client, submit(client, "warm-up", NAIVE, workers, "warm_evaluate"))
        warmed = len({t["worker"] for t in client.get(f"/v1/jobs/{warm['id']}/trials").json()["data"] if t["evaluated"]})
        if warm["status"] != "succeeded":
            raise SystemExit(f"warm-up job failed: {warm.get('error')}\n" + (root / "serve.log").read_text()[-3000:])
        job = wait(client, submit(client, case, CASES[case], workers))
        if job["status"] != "succeeded":
            raise SystemExit(f"job failed: {job.get('error')}\n" + (root / "serve.log").read_text()[-3000:])
        trials = client.get(f"/v1/jobs/{job['id']}/trials", params={"limit": 1000}).json()["data"]
        if os.environ.get("QT_BENCH_TIMELINE"):
            print("    finisher's seconds:", client.get(f"/v1/jobs/{job['id']}/report").json()["seconds"])
    if os.environ.get("QT_BENCH_TIMELINE"):
        t0 = datetime.fromisoformat(job["created_at"].replace("Z", "+00:00"))
        for t in trials:
            start = datetime.fromisoformat(t["started_at"].replace("Z", "+00:00")) if t["started_at"] else None
            print(f"    trial {t['number']:>2} {t['state']:<8} {t['worker'] or '-':<28} start "
                  f"{(start - t0).total_seconds() if start else float('nan'):6.2f}s dur {t['duration_s'] or 0:5.2f}s "
                  f"{'evaluated' if t['evaluated'] else ''} {t['summary']}")
        if os.environ.get("QT_BENCH_TIMELINE") == "log":  # the workers' lines (not the HTTP access log)
            print("\n".join(line for line in (root / "serve.log").read_text().splitlines()
                            if "quanttune" in line and "HTTP/1.1" not in line))
    by_worker = Counter(t["worker"] for t in trials if t["worker"])
    return {"wall_s": seconds(job), "evaluations": job["progress"]["evaluations"], "trials": job["progress"]["trials"],
            "coverage": job["coverage"], "met": job["met"], "drop": job["drop"],
            "evaluated": sum(t["evaluated"] for t in trials),
            "per_worker": sorted(by_worker.values(), reverse=True), "warmed": warmed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--eval-cost", type=float, default=2.0, help="seconds each evaluation sleeps (default 2)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    (tmp / "qt_bench").mkdir()
    (tmp / "qt_bench" / "__init__.py").write_text(EVAL_MODULE)
    os.environ.update({"QT_BENCH_EVAL_COST": str(args.eval_cost), "QUANTTUNE_ALLOWED_MODULES": "tuner.examples,qt_bench",
                       "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])})
    print(f"load average before: {os.getloadavg()[0]:.2f}; evaluation cost {args.eval_cost:g} s + the metric", flush=True)
    print("| database | case | workers | wall time | evaluations | trials (evaluated) | INT8 MACs | drop | met | trials per worker | workers warmed | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    postgres = Postgres().__enter__() if "postgresql" in dbs else None
    try:
        for db in dbs:
            for case in args.cases:
                for n in args.workers:
                    url = postgres.database() if db == "postgresql" else None
                    r = run(tmp / f"{db}-{case}-{n}", url, case, n)
                    print(f"| {db} | {case} | {n} | {r['wall_s']:.1f} s | {r['evaluations']} | {r['trials']} "
                          f"({r['evaluated']}) | {r['coverage']:.1%} | {r['drop']:.2%} | {'yes' if r['met'] else 'no'} | "
                          f"{r['per_worker']} | {r['warmed']} | {os.getloadavg()[0]:.1f} |", flush=True)
    finally:
        if postgres is not None:
            postgres.__exit__()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
