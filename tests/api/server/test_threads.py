"""The API's thread pools (api/threads.py): the request pool is sized per backend or by
QUANTTUNE_API_THREADS, and uploads being checked run in their own pool, so a burst of slow
submissions never holds up reads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from worker.settings import Settings
from api.threads import UPLOAD_THREADS

REF = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
       "evaluate": "tuner.examples.digits:evaluate"}


async def _request_threads() -> int:
    return anyio.to_thread.current_default_thread_limiter().total_tokens


@pytest.mark.parametrize("configured", [None, 5])
def test_request_pool_size(migrated_db: str, tmp_path: Path, configured: int | None) -> None:
    app = create_app(Settings(db=migrated_db, data_dir=tmp_path, api_threads=configured))
    with TestClient(app) as client:
        expected = configured or (2 if migrated_db.startswith("sqlite") else 8)
        assert client.portal.call(_request_threads) == expected


def test_slow_uploads_do_not_hold_up_reads(migrated_db: str, tmp_path: Path, make_token,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import api.routes.jobs as routes

    release, checking = threading.Event(), threading.Semaphore(0)
    real_check = routes.check_submission

    def slow_check(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        checking.release()
        assert release.wait(60), "never released"
        return real_check(*args, **kwargs)

    monkeypatch.setattr(routes, "check_submission", slow_check)
    app = create_app(Settings(db=migrated_db, data_dir=tmp_path, api_threads=1))
    token = {"Authorization": f"Bearer {make_token(migrated_db, 'alice')}"}
    with TestClient(app) as client:
        statuses: list[int] = []

        def submit(i: int) -> None:
            spec = json.dumps({**REF, "name": f"slow {i}"})
            statuses.append(client.post("/v1/jobs", headers=token, files={"spec": (None, spec)}).status_code)

        submitters = [threading.Thread(target=submit, args=(i,)) for i in range(UPLOAD_THREADS + 2)]
        for t in submitters:
            t.start()
        try:
            for _ in range(UPLOAD_THREADS):  # the upload pool is full: every upload thread is blocked in a check
                assert checking.acquire(timeout=60)
            assert not checking.acquire(timeout=0.5)  # the other two wait for the upload pool, not in it
            # the request pool (1 thread) is free: reads answer while every upload thread is busy
            reads = [client.get("/v1/jobs", headers=token) for _ in range(3)]
            assert [r.status_code for r in reads] == [200] * 3 and reads[-1].json()["count"] == 0
            assert client.get("/v1/health").status_code == 200
        finally:
            release.set()
            for t in submitters:
                t.join(60)
        assert statuses == [201] * (UPLOAD_THREADS + 2)
        assert client.get("/v1/jobs", headers=token).json()["count"] == UPLOAD_THREADS + 2
