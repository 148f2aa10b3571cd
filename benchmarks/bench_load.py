"""Issue 8 figures: the API's read endpoints under wrk, and 50 jobs submitted at once.

    apt-get install -y wrk                      # Debian's wrk (the benchmark needs it on PATH)
    python benchmarks/bench_load.py             # both parts, SQLite, on 127.0.0.1 only
    python benchmarks/bench_load.py --db postgresql+psycopg://postgres@127.0.0.1:5433/bench
    python benchmarks/bench_load.py --part reads --duration 20 --connections 32

Part 1 (reads): a real `quanttune serve --workers 0` holding one finished job (trials, artifacts)
and a page of queued ones, with 1 and then 2 API processes (`--api-processes`); wrk hammers each
read endpoint for `--duration` seconds with `--connections` connections and 2 threads. Printed per endpoint: requests/s, p50/p99 latency,
non-2xx responses and socket errors (target: >= 500 requests/s with zero errors on 2 cores).

Part 2 (jobs): a real `quanttune serve --workers N` (default 2); `--jobs` (default 50) small jobs
(a tiny uploaded model, the built-in agreement evaluator, max_trials=1) are submitted at the same
time from as many threads. Printed: accepted, finished, wall time, jobs/min, and the evidence
that none was lost or run twice (each job's lease slot was claimed exactly once, each job id is
claimed once in the workers' logs, each study holds one evaluated trial).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from api.cli.embedded import EmbeddedServerError, free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]


def quanttune(*args: str) -> list[str]:
    return [sys.executable, "-c", "from api.cli import main; main()", *args]


class Server:
    def __init__(self, root: Path, db: str | None, workers: int, api_processes: int = 1, token: str | None = None) -> None:
        self.root, self.workers, self.api_processes, self.token = root, workers, api_processes, token
        self.db = db or f"sqlite:///{root / 'quanttune.db'}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "QUANTTUNE_POLL_SECONDS": "0.2",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.env.pop("QUANTTUNE_DB", None)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        if self.token is None:
            subprocess.run(quanttune("migrate", "--db", self.db), check=True, capture_output=True, env=self.env)
            done = subprocess.run(quanttune("token", "create", "--db", self.db, "--name", "bench"), check=True,
                                  capture_output=True, text=True, env=self.env)
            self.token = done.stdout.strip().splitlines()[-1]
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / "serve.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            quanttune("serve", "--db", self.db, "--data-dir", str(self.root / "data"), "--port", str(self.port),
                      "--workers", str(self.workers), "--api-processes", str(self.api_processes), "--no-migrate"),
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
        try:
            wait_healthy(self.url, 120, self.process)
        except EmbeddedServerError as exc:
            raise SystemExit(f"{exc}:\n" + (self.root / "serve.log").read_text()[-3000:]) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)


def tiny_job_files(root: Path) -> dict[str, tuple[str, bytes]]:
    import torch
    from safetensors.torch import save
    from torch import nn

    from tuner.pt2_archive import export_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    return {"model_file": ("tiny.pt2", export_model(model, x[:8], root / "tiny.pt2").read_bytes()),
            "calibration_file": ("calibration.safetensors", save({"input": x}))}


TINY_SPEC = {"evaluator": "agreement", "max_trials": 1, "batch_size": 32}


def submit(client: httpx.Client, files: dict, name: str, **spec: object) -> int:
    response = client.post("/v1/jobs", files={"spec": (None, json.dumps({**TINY_SPEC, "name": name, **spec})), **files})
    response.raise_for_status()
    return response.json()["id"]


def wait_all(client: httpx.Client, ids: list[int], timeout: float) -> dict[int, dict]:
    deadline, jobs = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        page = client.get("/v1/jobs", params={"limit": 500}).json()["data"]
        jobs = {j["id"]: j for j in page if j["id"] in ids}
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs.values()) and len(jobs) == len(ids):
            return jobs
        time.sleep(0.5)
    return jobs


# -- part 1 ------------------------------------------------------------------------------------


def wrk(url: str, token: str, duration: int, connections: int) -> dict[str, float]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s",
               "-H", f"Authorization: Bearer {token}", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": ms("50%"), "p99": ms("99%"),
            "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
            "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children)


def part_reads(args: argparse.Namespace, root: Path) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    files = tiny_job_files(root)
    with Server(root / "reads", args.db, workers=0) as server, server.client() as client:
        finished = submit(client, files, "finished", max_trials=3)
        worker = subprocess.Popen(quanttune("worker", "--db", server.db, "--data-dir", str(root / "reads-worker")),
                                  env=server.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            jobs = wait_all(client, [finished], 300)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        assert jobs[finished]["status"] == "succeeded", jobs
        for i in range(20):
            submit(client, files, f"queued {i}")
        db, token = server.db, server.token
    endpoints = {"GET /v1/health": "/v1/health", "GET /v1/jobs (21 jobs)": "/v1/jobs",
                 "GET /v1/jobs/{id}": f"/v1/jobs/{finished}", "GET /v1/jobs/{id}/artifacts": f"/v1/jobs/{finished}/artifacts",
                 "GET /v1/jobs/{id}/trials": f"/v1/jobs/{finished}/trials"}
    for processes in args.api_processes:
        with Server(root / "reads", db, workers=0, api_processes=processes, token=token) as server, \
                server.client() as client:
            for path in endpoints.values():
                assert client.get(path).status_code == 200, path
            time.sleep(1)  # let every API process finish starting (the first answer needs only one)
            load = os.getloadavg()[0]
            print(f"\nread endpoints, wrk -t2 -c{args.connections} -d{args.duration}s on 127.0.0.1, {os.cpu_count()} "
                  f"CPUs (load average {load:.1f} before), `serve --api-processes {processes}`, "
                  f"database {server.db.split(':')[0]}")
            print(f"{'endpoint':<30}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'requests':>10}{'non-2xx':>9}"
                  f"{'sock err':>9}{'server CPU ms/req':>19}")
            for label, path in endpoints.items():
                cpu = cpu_seconds(server.process.pid)
                r = wrk(server.url + path, server.token, args.duration, args.connections)
                per_request = 1000 * (cpu_seconds(server.process.pid) - cpu) / max(r["requests"], 1)
                print(f"{label:<30}{r['rps']:>9.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['requests']:>10}"
                      f"{r['non2xx']:>9}{r['socket_errors']:>9}{per_request:>19.2f}")
            log = (server.root / "serve.log").read_text(errors="replace")
            print(f"server log: {log.count('internal error')} internal errors")
    print("server CPU ms/req: CPU time the API processes spent per request (1000 / it = the requests/s one "
          "core can serve, whatever else runs on the machine)")


# -- part 2 ------------------------------------------------------------------------------------


def part_jobs(args: argparse.Namespace, root: Path) -> None:
    from sqlalchemy import select

    from worker.db import make_engine, make_sessionmaker
    from worker.models import Lease

    files = tiny_job_files(root)
    with Server(root / "jobs", args.db, workers=args.workers) as server, server.client() as client:
        ids: list[int] = []
        errors: list[str] = []
        barrier = threading.Barrier(args.jobs)

        def one(i: int) -> None:
            barrier.wait()
            try:
                with server.client() as own:
                    ids.append(submit(own, files, f"load {i}"))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")

        start = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        submitted_s = time.monotonic() - start
        jobs = wait_all(client, ids, args.timeout)
        wall = time.monotonic() - start
        statuses = {s: sum(j["status"] == s for j in jobs.values()) for s in ("succeeded", "failed", "cancelled")}
        engine = make_engine(server.db)
        with make_sessionmaker(engine)() as session:
            claims = dict(session.execute(select(Lease.job_id, Lease.claims).where(Lease.job_id.in_(ids))).all())
        engine.dispose()
        log = (server.root / "serve.log").read_text(errors="replace")
        claimed = re.findall(r"claimed job (\d+) slot", log)
        trials = {i: client.get(f"/v1/jobs/{i}/trials", params={"state": "COMPLETE"}).json()["count"] for i in ids}
        print(f"\n{args.jobs} jobs submitted at once to `serve --workers {args.workers}` ({os.cpu_count()} CPUs, "
              f"database {server.db.split(':')[0]}): tiny uploaded model, agreement evaluator, max_trials=1")
        print(f"accepted {len(ids)}/{args.jobs} in {submitted_s:.1f}s (errors: {errors[:3] or 'none'})")
        print(f"finished {sum(statuses.values())}/{len(ids)} in {wall:.1f}s: {statuses}; "
              f"{60 * len(ids) / wall:.0f} jobs/min")
        print(f"lease claims per job: {sorted(set(claims.values()))} (1 = claimed once); claimed in the logs: "
              f"{len(claimed)} times, {len(set(claimed))} distinct jobs; evaluated trials per job: "
              f"{sorted(set(trials.values()))}")
        lost = sorted(set(ids) - {int(c) for c in claimed})
        twice = sorted({int(c) for c in claimed if claimed.count(c) > 1})
        print(f"lost: {lost or 'none'}; run twice: {twice or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("reads", "jobs", "all"), default="all")
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per endpoint")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--api-processes", type=int, nargs="+", default=[1, 2],
                        help="`serve --api-processes` values to measure the reads with, in turn")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quanttune-bench-load-") as tmp:
        root = Path(tmp)
        if args.part in ("reads", "all"):
            part_reads(args, root)
        if args.part in ("jobs", "all"):
            part_jobs(args, root)


if __name__ == "__main__":
    main()
