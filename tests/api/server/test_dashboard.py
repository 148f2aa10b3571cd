"""The dashboard, for real: a `quanttune serve` process (API + one worker, SQLite) that ran a small
digits job with a restricted space (so it needed several trials and fell some layers back), plain
HTTP checks of the login/logout cookie session and ownership, and a headless Debian Chromium
driven by Playwright that logs in, reads the pages, counts what the plots drew, and cancels a
running job. Screenshots go to `test-artifacts/dashboard/`.

Jobs that must be caught running are gated (`tests.support.Gate`): each evaluation waits for the
test to let it through, so the tests wait on those handshakes, never on the machine's speed; their
timeouts only guard against hangs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support import Gate, ServerProcess, submit, user_package, wait_job

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[3]
SHOTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DIGITS = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
          "evaluate": "tuner.examples.digits:evaluate"}
# per-tensor max/affine everywhere: the outlier channel breaks full INT8, so the search falls back layers
NAIVE = {"activation": ["max"], "weights": ["per_tensor"], "scheme": ["affine"], "smooth": False}


class Server(ServerProcess):
    """`quanttune serve` with one worker, two tokens (alice, bob) and alice's finished job."""

    alice: str
    bob: str
    job: dict
    gates: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, follow_redirects=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dashboard")
    usercode = user_package(root / "usercode", "qt_dash_usercode", '''
        import os, time
        from pathlib import Path
        from torch import nn
        from tests.support import pass_gate
        from tuner.examples import digits

        GATES = Path(os.environ["QT_TEST_GATES"])

        def gated_never_enough(model):
            """Each call waits at gates/live; every candidate loses 5 points: no plan meets the budget."""
            call = pass_gate(GATES / "live")
            return digits.evaluate(model) - (0.0 if call == 1 else 5.0)  # the first call is the baseline

        def gated_phases(model):
            """Each call waits at gates/phases; the baseline (call 1) leaves `baseline.done` there."""
            call = pass_gate(GATES / "phases")
            score = digits.evaluate(model)
            if call == 1:
                (GATES / "phases" / "baseline.done").touch()
            return score

        def broken(model):
            raise RuntimeError("the evaluation data set is missing")

        class HeldCalibration(nn.Module):
            """digits' CNN; once the baseline is known, its forward (calibration's first run) waits for
            gates/phases/calibrate.go."""

            def __init__(self):
                super().__init__()
                self.net = digits.build_model()

            def forward(self, x):
                gate = GATES / "phases"
                if (gate / "baseline.done").exists() and not (gate / "calibrate.go").exists():
                    (gate / "calibrate.started").touch()
                    deadline = time.monotonic() + 600
                    while not ((gate / "calibrate.go").exists() or (gate / "open").exists()):
                        if time.monotonic() > deadline:
                            raise TimeoutError("calibration was never let through")
                        time.sleep(0.05)
                return self.net(x)
    ''')
    gates = root / "gates"
    with Server(root, allowed=["qt_dash_usercode"], importable=[usercode],
                env={"QT_TEST_GATES": str(gates)}) as served:
        served.gates = gates
        served.alice, served.bob = served.new_token("alice"), served.new_token("bob")
        with served.client(served.alice) as client:
            job_id = submit(client, {"name": "digits naive", **DIGITS, "space": NAIVE, "max_trials": 12})
            served.job = wait_job(client, job_id, lambda j: j["status"] == "succeeded", 240, served)
        yield served


# ---------------------------------------------------------------- plain HTTP


@contextmanager
def _login(server: Server, token: str) -> Iterator[httpx.Client]:
    with server.client() as client:
        response = client.post("/dashboard/login", data={"token": token, "next": "/dashboard/jobs"})
        assert response.status_code == 303 and response.headers["location"] == "/dashboard/jobs", response.text
        yield client


def _token_row(server: Server, name: str):  # noqa: ANN202
    from sqlalchemy import select

    from worker.db import make_engine, make_sessionmaker
    from worker.models import Token

    engine = make_engine(server.db_url)
    with make_sessionmaker(engine)() as session:
        row = session.scalar(select(Token).where(Token.name == name))
    engine.dispose()
    return row


def test_login_sets_a_signed_httponly_session_and_logout_clears_it(server: Server) -> None:
    from api.dashboard.session import MAX_AGE_S, session_value

    job_id = server.job["id"]
    with server.client() as anonymous:
        to_login = anonymous.get(f"/dashboard/jobs/{job_id}")
        assert to_login.status_code == 303
        assert to_login.headers["location"] == f"/dashboard/login?next=%2Fdashboard%2Fjobs%2F{job_id}"
        assert anonymous.get("/dashboard/").headers["location"] == "/dashboard/jobs"
        page = anonymous.get("/dashboard/login")
        assert page.status_code == 200 and 'name="token"' in page.text
        for bad in ("qt_not-a-token", "   "):
            refused = anonymous.post("/dashboard/login", data={"token": bad, "next": "/dashboard/jobs"})
            assert refused.status_code == 401 and "set-cookie" not in refused.headers
            assert "Unknown token" in refused.text or "Enter your API token" in refused.text
        # `next` only ever leads inside the dashboard
        for target, lands in ((f"/dashboard/jobs/{job_id}", f"/dashboard/jobs/{job_id}"),
                              ("https://evil.example/", "/dashboard/jobs"), ("//evil.example/x", "/dashboard/jobs")):
            response = anonymous.post("/dashboard/login", data={"token": server.alice, "next": target})
            assert (response.status_code, response.headers["location"]) == (303, lands)
        cross_site = anonymous.post("/dashboard/login", data={"token": server.alice, "next": "/dashboard/jobs"},
                                    headers={"Origin": "https://evil.example"})
        assert cross_site.status_code == 403 and "set-cookie" not in cross_site.headers
        anonymous.cookies.clear()

    with _login(server, server.alice) as alice:
        set_cookie = alice.cookies.jar
        cookie = next(c for c in set_cookie if c.name == "quanttune_session")
        assert cookie.path == "/" and cookie.has_nonstandard_attr("HttpOnly")
        assert cookie.get_nonstandard_attr("SameSite").lower() == "lax"
        assert server.alice not in cookie.value and hashlib.sha256(server.alice.encode()).hexdigest() not in cookie.value
        jobs_page = alice.get("/dashboard/jobs")
        assert jobs_page.status_code == 200 and "alice" in jobs_page.text
        assert "default-src 'self'" in jobs_page.headers["content-security-policy"]
        assert alice.get("/dashboard/login?next=/dashboard/jobs").headers["location"] == "/dashboard/jobs"
        # the JSON API accepts the session too (the pages poll it) ...
        assert job_id in [j["id"] for j in alice.get("/v1/jobs").json()["data"]]
        # ... but a state-changing call needs the dashboard's header besides the cookie (no CSRF)
        assert alice.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
        with_header = alice.post(f"/v1/jobs/{job_id}/cancel", headers={"X-Quanttune-Dashboard": "1"})
        assert with_header.status_code == 409 and with_header.json()["error"]["code"] == "conflict"  # it succeeded
        value = cookie.value

        logout = alice.post("/dashboard/logout")
        assert logout.status_code == 303 and logout.headers["location"] == "/dashboard/login"
        assert re.search(r'quanttune_session=""?;.*Max-Age=0', logout.headers["set-cookie"], re.I)
        assert "quanttune_session" not in alice.cookies
        assert alice.get("/dashboard/jobs").status_code == 303
        assert alice.get("/v1/jobs").status_code == 401

    row_alice, row_bob = _token_row(server, "alice"), _token_row(server, "bob")
    token_id, expires, mac = value.split(".")
    forged = {
        "tampered": f"{token_id}.{expires}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}",
        "extended": f"{token_id}.{int(expires) + 3600}.{mac}",
        "other token's key": session_value(row_bob).replace(f"{row_bob.id}.", f"{row_alice.id}.", 1),
        "expired": session_value(row_alice, now=time.time() - 2 * MAX_AGE_S),
        "garbage": "1.2",
    }
    for what, cookie_value in forged.items():
        with server.client() as client:
            client.cookies.set("quanttune_session", cookie_value)
            assert client.get("/dashboard/jobs").status_code == 303, what
            assert client.get("/v1/jobs").status_code == 401, what
    with server.client() as client:  # the same construction, honestly signed, is accepted
        client.cookies.set("quanttune_session", session_value(row_alice))
        assert client.get("/dashboard/jobs").status_code == 200


def test_other_tokens_cannot_see_the_job(server: Server) -> None:
    job_id = server.job["id"]
    with _login(server, server.bob) as bob:
        page = bob.get(f"/dashboard/jobs/{job_id}")
        assert page.status_code == 404 and "Job not found" in page.text and server.job["name"] not in page.text
        assert bob.get("/v1/jobs").json() == {"data": [], "count": 0}
        for path in ("", "/trials", "/ledger", "/report", "/artifacts/model.onnx"):
            assert bob.get(f"/v1/jobs/{job_id}{path}").status_code == 404, path
    with _login(server, server.alice) as alice:
        page = alice.get(f"/dashboard/jobs/{job_id}")
        assert page.status_code == 200 and server.job["name"] in page.text
        model = alice.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
        assert model.status_code == 200 and len(model.content) > 1000
        # every asset is served locally: no CDN
        scripts = re.findall(r'<script[^>]*src="([^"]+)"', page.text)
        assert scripts and all(src.startswith("/dashboard/static/") for src in scripts), scripts
        assert all(href.startswith(("/dashboard/", "data:")) for href in re.findall(r'<link[^>]*href="([^"]+)"', page.text))
        plotly = alice.get("/dashboard/static/plotly.min.js")
        assert plotly.status_code == 200 and b"plotly.js v" in plotly.content[:200] and len(plotly.content) > 1_000_000
        assert alice.get("/dashboard/static/app.js").status_code == 200
        assert alice.get("/dashboard/static/pages.py").status_code == 404


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian chromium is not installed (scripts/test.sh installs it as root with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed (test extra)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A browser page for one user, recording console errors and uncaught exceptions."""

    def __init__(self, browser, server: Server) -> None:  # noqa: ANN001
        self.context = browser.new_context(base_url=server.url, viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def login(self, token: str) -> None:
        self.page.goto("/dashboard/jobs")
        assert "/dashboard/login" in self.page.url  # sent to the login page first
        self.page.fill("#token", token)
        self.page.click("#login-button")
        self.page.wait_for_url("**/dashboard/jobs")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def alice_page(browser, server: Server) -> Iterator[Page]:  # noqa: ANN001
    page = Page(browser, server)
    page.login(server.alice)
    yield page
    page.close()


def _poll(predicate, what: str, timeout: float = 20) -> None:  # noqa: ANN001
    """Wait for a condition on the page (the pages' CSP forbids Playwright's string predicates)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def _ms(ms: float) -> str:
    """A latency as the pages write it."""
    if ms < 1:
        return f"{float(f'{ms:.2g}')!r} ms"
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


def _points(page, plot: str) -> int:  # noqa: ANN001
    """Markers plotly drew in a plot's SVG (line traces draw none)."""
    return page.locator(f"#{plot} svg.main-svg g.trace.scatter path.point").count()


def test_finished_job_pages_render_every_plot_table_and_layer(alice_page: Page, server: Server) -> None:
    page, job = alice_page.page, server.job
    with server.client(server.alice) as api:
        trials = api.get(f"/v1/jobs/{job['id']}/trials", params={"limit": 1000}).json()["data"]
        ledger = api.get(f"/v1/jobs/{job['id']}/ledger").json()
        report = api.get(f"/v1/jobs/{job['id']}/report").json()
    # all INT8, then 1 and 2 layers FP32 (one INT8 setting: nothing left to sample after that)
    assert len(trials) >= 3 and report["fp32_layers"], "the restricted space should need fallbacks and trials"
    assert all(t["worker"] for t in trials)  # the Worker column has something to show

    row = page.locator(f"#jobs tr[data-job-id='{job['id']}']")
    row.wait_for()
    assert row.get_attribute("data-status") == "succeeded"
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "succeeded" and f"{job['progress']['trials']} / 12 trials" in cells[2]
    assert cells[7] == str(job["progress"]["evaluations"]) and cells[6] == f"{100 * job['coverage']:.1f}%"
    int8_ms = next(r["int8_ms"] for r in job["deployment"]["latency"] if r["batch"] == 1 and r["threads"] == 1)
    assert cells[9] == _ms(int8_ms)  # the deployed latency
    assert row.get_attribute("data-outcome") == ("met" if job["met"] else "not-met")
    page.select_option("#status-filter", "succeeded")
    page.wait_for_url("**/dashboard/jobs?status=succeeded")
    _poll(lambda: page.locator("#jobs tbody tr[data-status]:not([data-status='succeeded'])").count() == 0,
          "only succeeded jobs listed")
    assert row.is_visible()
    alice_page.shot("jobs")

    row.locator("a.job-link").click()
    page.wait_for_url(f"**/dashboard/jobs/{job['id']}")
    page.wait_for_selector("body[data-ready='final']")
    page.wait_for_selector("#plot-sqnr svg.main-svg")

    # trials table: one row per trial, sortable
    assert page.locator("#trials tbody tr[data-trial]").count() == len(trials)
    numbers = [int(n) for n in page.locator("#trials tbody tr").evaluate_all("rs => rs.map(r => r.dataset.trial)")]
    assert numbers == sorted(t["number"] for t in trials)
    workers = page.locator("#trials tbody tr").evaluate_all("rs => rs.map(r => r.children[7].textContent)")
    assert workers == [t["worker"] for t in sorted(trials, key=lambda t: t["number"])]  # who ran each trial
    assert page.inner_text("#by-worker").startswith(f"By worker — {trials[0]['worker']}: {len(trials)} trial{'s' if len(trials) != 1 else ''}")
    page.click("#trials th[data-key='score']")
    by_score = [t["score"] for t in sorted(trials, key=lambda t: (t["score"] is None, t["score"] or 0, t["number"]))]
    shown = page.locator("#trials tbody tr").evaluate_all("rs => rs.map(r => r.children[3].textContent)")
    assert [s == "–" for s in shown] == [s is None for s in by_score]
    assert [float(s) for s in shown if s != "–"] == pytest.approx([s for s in by_score if s is not None], rel=1e-3)
    assert page.get_attribute("#trials th[data-key='score']", "aria-sort") == "ascending"
    page.click("#trials th[data-key='score']")
    assert page.get_attribute("#trials th[data-key='score']", "aria-sort") == "descending"
    first = page.locator("#trials tbody tr").first.locator("td").nth(3).inner_text()
    assert float(first) == pytest.approx(max(t["score"] for t in trials if t["score"] is not None), rel=1e-3)

    # plots: SVG with one marker per trial that has a score / a drop and a coverage
    scored = [t for t in trials if t["score"] is not None]
    placed = [t for t in trials if t["drop"] is not None and t["coverage"] is not None]
    assert scored and len(placed) == len(scored)
    assert _points(page, "plot-score") == len(scored)
    assert _points(page, "plot-drop") == len(placed)
    assert page.locator("#plot-drop g.trace.scatter path.js-line").count() >= 1  # the frontier
    assert page.locator("#plot-score .shapelayer path").count() == 2  # baseline and budget lines
    assert page.locator("#plot-drop .shapelayer path").count() == 1  # budget line
    # the drop axis is zoomed on the budget: its line sits well inside the plot, not flat on the axis
    low, high = page.evaluate("() => document.getElementById('plot-drop')._fullLayout.yaxis.range")
    budget = 100 * job["max_drop"]
    assert low < 0 < budget < high <= 3 * budget + 1e-9 and (budget - low) / (high - low) > 0.25
    drawn = page.evaluate("() => document.getElementById('plot-drop').data[1].y")
    assert all(low <= y <= high for y in drawn)  # larger drops on the top edge (as triangles), not off the plot

    # per-layer SQNR: one layers x settings heatmap (not one bar series per setting), the chosen setting framed
    traces = page.evaluate("() => document.getElementById('plot-sqnr').data.map(t => [t.type, t.x, t.y, t.z || null])")
    assert [t[0] for t in traces] == ["heatmap", "scatter"]
    _, settings, layers, z = traces[0]
    assert layers == [n for n in ledger["layers"] if n in ledger["ledger"]] and settings
    for i, name in enumerate(layers):
        for j, setting in enumerate(settings):
            assert z[i][j] == pytest.approx(ledger["ledger"][name]["sqnr_db"].get(setting), nan_ok=True)
    framed = dict(zip(traces[1][2], traces[1][1]))
    assert framed == {n: e["decision"][5:] for n, e in ledger["ledger"].items() if e["decision"].startswith("int8 ")}
    assert page.locator("#plot-sqnr g.heatmaplayer image").count() == 1

    # the ledger: every layer, its decision in the best plan, its state across every trial
    assert page.locator("#ledger tbody tr[data-layer]").count() == len(ledger["layers"]) > 0
    for name in ledger["layers"]:
        layer_row = page.locator(f"#ledger tr[data-layer='{name}']")
        assert layer_row.locator("td").nth(1).inner_text() == ledger["ledger"][name]["decision"]
        assert layer_row.locator(".strip i.cell").count() == len(trials)
        assert layer_row.locator(".strip i.cell.fp32").count() == sum(name in t["fp32_layers"] for t in trials)
        assert (layer_row.locator("td").nth(1).inner_text().startswith("fp32")) == (name in report["fp32_layers"])

    # the chosen plan, the deployed model, artifacts
    plan_text = page.inner_text("#plan-groups")
    assert "max · affine · per_tensor" in plan_text and all(layer in plan_text for layer in report["fp32_layers"])
    deployed = page.inner_text("#deployed-figures")
    assert report["deployed_score"] is not None
    assert "Score on ONNX Runtime" in deployed and f"{report['deployed_score']:.4g}"[:4] in deployed
    assert sorted(page.locator("#artifacts a.artifact").all_inner_texts()) == sorted(job["artifacts"])

    # deployed on ONNX Runtime: INT8 kernels x/y, FP32 vs INT8 latency per batch size and threads, float layers
    deployment = job["deployment"]
    assert deployment["int8_layers"] == len(report["int8_layers"]) and len(deployment["latency"]) == 4
    kernels_text = page.inner_text("#runtime-kernels")
    assert f"{deployment['int8_kernels']}/{deployment['int8_layers']} planned INT8 layers" in kernels_text
    assert f"{100 * deployment['int8_macs_running']:.1f}% of MACs run INT8" in kernels_text
    assert page.locator("#runtime-latency tbody tr").count() == len(deployment["latency"])
    for row in deployment["latency"]:
        cells = page.locator(f"#runtime-latency tr[data-batch='{row['batch']}'][data-threads='{row['threads']}'] td")
        shown = cells.all_inner_texts()
        assert shown[1:] == ["1" if row["threads"] == 1 else "all", f"{row['fp32_ms']:.3f}", f"{row['int8_ms']:.3f}",
                             f"{row['speedup']:.2f}×"], shown
    assert page.locator("#runtime-float li[data-layer]").count() == len(deployment["float_layers"])
    for floating in deployment["float_layers"]:
        assert floating["reason"] in page.inner_text(f"#runtime-float li[data-layer='{floating['layer']}']")
    calibration_row = next(r for r in deployment["latency"] if r["batch"] == deployment["calibration_batch"]
                           and r["threads"] == 1)
    speedup_card = page.locator("#summary .stat", has_text="INT8 speed-up").inner_text()
    assert f"{calibration_row['speedup']:.2f}×" in speedup_card
    batch1 = next(r for r in deployment["latency"] if r["batch"] == 1 and r["threads"] == 1)
    latency_card = page.locator("#summary .stat[data-card='Deployed latency']")
    assert latency_card.locator(".value").inner_text() == _ms(batch1["int8_ms"])
    assert f"FP32 {_ms(batch1['fp32_ms'])}" in latency_card.inner_text()
    verdicts = report["deployment"]["kernels"]["layers"]
    for name in ledger["layers"]:  # the ledger says what ONNX Runtime runs for each layer
        verdict = verdicts[name]
        expected = (f"{verdict['kernel']} ({'INT8' if verdict['int8'] else 'float'})"
                    if verdict["planned"] == "int8" else "–")
        assert page.locator(f"#ledger tr[data-layer='{name}'] td").nth(2).inner_text() == expected
    with page.expect_download() as download:
        page.click("#artifacts a.artifact:text('plan.json')")
    assert json.loads(Path(download.value.path()).read_text())["layers"] == report["plan"]["layers"]
    assert page.is_hidden("#cancel-button")
    assert page.is_hidden("#job-outcome") == bool(job["met"]) and page.is_hidden("#job-phase")
    alice_page.shot("job-finished")
    assert not alice_page.errors, alice_page.errors


def _wait_started(gate: Gate, call: int, server: Server, what: str) -> None:
    """Until the gated evaluation's call `call` is waiting at `gate` (a hang guard, not a pace)."""
    _poll(lambda: gate.started(call), f"{what} (evaluation call {call}) to start\n{gate.state()}\n{server.logs()}", 300)


def _complete_rows(page) -> int:  # noqa: ANN001
    return page.locator("#trials tbody tr[data-trial] td.state-COMPLETE").count()


def test_live_updates_and_cancel_from_the_page(alice_page: Page, server: Server) -> None:
    """Every evaluation waits at a gate: the page is checked while the job is provably held between
    two known states, so no step depends on how fast the machine runs the search."""
    page, gate = alice_page.page, Gate(server.gates / "live")
    with server.client(server.alice) as api:
        job_id = submit(api, {"name": "gated, never within budget", **DIGITS, "space": NAIVE, "max_trials": 60,
                               "evaluate": "qt_dash_usercode.evals:gated_never_enough"})
        try:
            _wait_started(gate, 1, server, "the FP32 baseline")
            gate.release(1)
            _wait_started(gate, 2, server, "trial 0")  # held: no trial has finished

            page.goto("/dashboard/jobs")
            progress = page.locator(f"#jobs tr[data-job-id='{job_id}'] td:nth-child(3)")
            _poll(lambda: "Searching" in progress.inner_text(), "the jobs page to show the running job's phase", 60)
            gate.release(2)  # trial 0 finishes: the page polls the JSON API and shows it without a reload
            _poll(lambda: re.match(r"\d+ / 60 trials", progress.inner_text()), "the jobs page to show new progress", 60)

            _wait_started(gate, 3, server, "the next evaluated trial")  # held again
            page.click(f"#jobs tr[data-job-id='{job_id}'] a.job-link")
            page.wait_for_selector("body[data-ready='live']")
            page.wait_for_selector("#plot-score svg.main-svg")
            _poll(lambda: page.locator("#trials tbody tr[data-trial] td.state-RUNNING").count() == 1,
                  "the held trial's RUNNING row", 60)
            shown = _complete_rows(page)
            gate.release(3)
            _wait_started(gate, 4, server, "the evaluation after it")  # held: the trials are fixed now
            finished = sum(t["state"] == "COMPLETE" for t in
                           api.get(f"/v1/jobs/{job_id}/trials", params={"limit": 1000}).json()["data"])
            assert finished > shown
            _poll(lambda: _complete_rows(page) == finished, "the new trial rows without reload", 60)
            assert _points(page, "plot-score") == finished
            assert page.inner_text("#job-status") == "running" and page.is_visible("#cancel-button")
            alice_page.shot("job-running")

            dialogs: list[str] = []
            page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
            page.click("#cancel-button")
            page.wait_for_selector("#job-status:text-is('cancelled')")
            assert dialogs and f"#{job_id}" in dialogs[0]
            page.wait_for_selector("#cancel-button", state="hidden")
        finally:
            gate.open()  # the held evaluation returns; the worker sees the job cancelled and stops
        job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["reason"] == "cancelled by the user"
    alice_page.shot("job-cancelled")

    page.goto("/dashboard/jobs?status=cancelled")
    page.wait_for_selector(f"#jobs tr[data-job-id='{job_id}'][data-status='cancelled']")
    assert page.locator(f"#jobs tr[data-job-id='{server.job['id']}']").count() == 0
    assert not alice_page.errors, alice_page.errors


def test_the_phase_shows_while_the_baseline_and_calibration_run(alice_page: Page, server: Server) -> None:
    page, gate = alice_page.page, Gate(server.gates / "phases")
    with server.client(server.alice) as api:
        job_id = submit(api, {**DIGITS, "name": "phases", "model": "qt_dash_usercode.evals:HeldCalibration",
                              "evaluate": "qt_dash_usercode.evals:gated_phases", "max_trials": 3})
        try:
            _wait_started(gate, 1, server, "the FP32 baseline")
            page.goto(f"/dashboard/jobs/{job_id}")
            page.wait_for_selector("#job-phase:text-is('Evaluating the FP32 baseline…')")
            baseline_card = page.locator("#summary .stat[data-card='Baseline (FP32)'] .value")
            assert baseline_card.inner_text() == "Evaluating the FP32 baseline…"  # not a dash
            page.goto("/dashboard/jobs")
            cell = page.locator(f"#jobs tr[data-job-id='{job_id}'] td:nth-child(3)")
            cell.wait_for()
            _poll(lambda: cell.inner_text() == "Evaluating the FP32 baseline…", "the phase in the jobs list")
            alice_page.shot("jobs-phase-baseline")

            gate.release(1)
            _poll(lambda: (server.gates / "phases" / "calibrate.started").exists(), "calibration to be held", 300)
            page.goto(f"/dashboard/jobs/{job_id}")
            page.wait_for_selector("#job-phase:text-is('Calibrating and measuring per-layer errors…')")
            baseline = api.get(f"/v1/jobs/{job_id}/ledger").json()["baseline"]
            _poll(lambda: "…" not in baseline_card.inner_text(), "the baseline instead of the phase")
            assert float(baseline_card.inner_text()) == pytest.approx(baseline, rel=1e-3)
            assert page.locator("#summary .stat[data-card='Best score so far'] .value").inner_text() == \
                "Calibrating and measuring per-layer errors…"
            alice_page.shot("job-phase-calibration")

            (server.gates / "phases" / "calibrate.go").touch()
            _wait_started(gate, 2, server, "trial 0")
            _poll(lambda: page.inner_text("#job-phase").startswith("Searching"), "the search phase", 60)
        finally:
            api.post(f"/v1/jobs/{job_id}/cancel")
            gate.open()
            (server.gates / "phases" / "calibrate.go").touch()
    assert not alice_page.errors, alice_page.errors


def test_not_met_and_failed_jobs_stand_out(alice_page: Page, server: Server) -> None:
    page = alice_page.page
    with server.client(server.alice) as api:
        # one trial, all INT8 with the naive setting: over the 1% budget, so the job ends without meeting it
        missed = submit(api, {**DIGITS, "name": "one trial, not met", "space": NAIVE, "max_trials": 1})
        failed = submit(api, {**DIGITS, "name": "broken evaluation", "evaluate": "qt_dash_usercode.evals:broken"})
        missed_job = wait_job(api, missed, lambda j: j["status"] == "succeeded", 300, server)
        wait_job(api, failed, lambda j: j["status"] == "failed", 300, server, allow=("failed",))
    assert missed_job["met"] is False

    page.goto("/dashboard/jobs")
    not_met = page.locator(f"#jobs tr[data-job-id='{missed}']")
    not_met.wait_for()
    assert not_met.get_attribute("data-outcome") == "not-met" and "outcome-not-met" in not_met.get_attribute("class")
    assert not_met.locator("td").nth(1).inner_text() == "succeeded budget not met"
    broken = page.locator(f"#jobs tr[data-job-id='{failed}']")
    assert broken.get_attribute("data-outcome") == "failed"
    met = page.locator(f"#jobs tr[data-job-id='{server.job['id']}']")

    def colour(locator, selector: str, prop: str) -> str:  # noqa: ANN001
        return locator.locator(selector).first.evaluate(f"e => getComputedStyle(e).{prop}")

    shades = {colour(row, "td", "boxShadow") for row in (not_met, broken, met)}
    assert len(shades) == 3  # orange edge, red edge, none
    assert colour(not_met, ".outcome-not-met", "color") not in (colour(met, ".badge", "color"),
                                                                colour(broken, ".badge", "color"))
    alice_page.shot("jobs-outcomes")

    page.goto(f"/dashboard/jobs/{missed}")
    page.wait_for_selector("body[data-ready='final'][data-outcome='not-met']")
    assert page.is_visible("#job-outcome") and page.inner_text("#job-outcome") == "budget not met"
    assert page.inner_text("#job-status") == "succeeded"
    assert not alice_page.errors, alice_page.errors


def test_another_token_sees_neither_the_job_nor_its_page(browser, server: Server) -> None:  # noqa: ANN001
    bob = Page(browser, server)
    try:
        bob.login(server.bob)
        bob.page.wait_for_selector("#jobs tbody tr.empty:has-text('No jobs yet.')")
        assert bob.page.locator("#jobs tbody tr[data-job-id]").count() == 0
        response = bob.page.goto(f"/dashboard/jobs/{server.job['id']}")
        assert response.status == 404
        assert bob.page.inner_text("#error-title") == "Job not found"
        assert server.job["name"] not in bob.page.content()
        bob.shot("other-token-404")
        bob.page.click("#logout")
        bob.page.wait_for_url("**/dashboard/login")
        bob.page.goto("/dashboard/jobs")
        assert "/dashboard/login" in bob.page.url
    finally:
        bob.close()


def test_job_names_are_shown_as_text_never_run_as_html(alice_page: Page, server: Server) -> None:
    name = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    with server.client(server.alice) as api:
        job_id = submit(api, {"name": name, **DIGITS, "max_trials": 1})
        api.post(f"/v1/jobs/{job_id}/cancel")  # it need not run
    page = alice_page.page
    page.goto("/dashboard/jobs")
    link = page.locator(f"#jobs tr[data-job-id='{job_id}'] a.job-link")
    assert link.inner_text() == f"#{job_id} {name}"
    link.click()
    page.wait_for_selector("body[data-ready='final']")
    assert page.inner_text("#job-name") == name
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("main img, main script:not(#job-data)").count() == 0  # only the inert JSON block
