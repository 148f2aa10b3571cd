"""What the CLI says when something is wrong, against a real `quanttune serve` process
(tests/api/conftest.py): one line naming the flag or setting to change, JSON on stdout with
`--json`; `token list | revoke` and `delete`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app

DIGITS = ("tuner.examples.digits:build_model", "-c", "tuner.examples.digits:calibration_data")


def cli(env: dict[str, str], *args: str):  # noqa: ANN201
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def test_token_commands_outside_the_servers_folder_say_which_flag_to_give(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    unset = {"QUANTTUNE_DB": None, "QUANTTUNE_DATA_DIR": None}
    for args in (("token", "create", "--name", "me"), ("token", "list"), ("token", "revoke", "1")):
        result = CliRunner().invoke(app, list(args), env=unset)
        assert result.exit_code == 1 and result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.output
        assert "no quanttune database at" in result.stderr and "`--db URL`" in result.stderr
        assert "`--data-dir DIR`" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "quanttune-data").exists()  # nothing created on the way
    (tmp_path / "empty.db").touch()
    empty = CliRunner().invoke(app, ["token", "list", "--db", f"sqlite:///{tmp_path / 'empty.db'}"], env=unset)
    assert empty.exit_code == 1 and "is not a quanttune database (no tables)" in empty.stderr


def test_token_list_and_revoke(running_server, env: dict[str, str]) -> None:  # noqa: ANN001
    doomed = running_server.new_token("to revoke")
    listed = json.loads(cli(env, "token", "list", "--db", running_server.db_url, "--json").stdout)
    row = next(t for t in listed["data"] if t["name"] == "to revoke")
    assert row["state"] == "active" and row["jobs"] == 0 and listed["count"] == len(listed["data"])
    assert cli({**env, "QUANTTUNE_TOKEN": doomed}, "jobs").exit_code == 0

    revoked = cli(env, "token", "revoke", str(row["id"]), "--db", running_server.db_url)
    assert revoked.exit_code == 0 and revoked.stdout == f"token {row['id']} (to revoke) revoked\n"
    refused = cli({**env, "QUANTTUNE_TOKEN": doomed}, "jobs")
    assert refused.exit_code == 1 and "invalid token." in refused.stderr
    table = cli(env, "token", "list", "--db", running_server.db_url)
    assert table.exit_code == 0 and "revoked" in table.stdout and "test_cli_messages" in table.stdout
    unknown = cli(env, "token", "revoke", "999999", "--db", running_server.db_url)
    assert unknown.exit_code == 1 and "no token with id 999999" in unknown.stderr


def test_missing_token_names_the_variable_and_the_flag(env: dict[str, str]) -> None:
    no_token = {k: v for k, v in env.items() if k != "QUANTTUNE_TOKEN"}
    result = cli(no_token, "jobs")
    assert result.exit_code == 1 and "no API token: set QUANTTUNE_TOKEN or pass --token" in result.stderr
    as_json = cli(no_token, "status", "1", "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["error"]["code"] == "no_token"


def test_spec_and_upload_errors_name_the_flag_and_are_json_with_json(env: dict[str, str], tmp_path: Path) -> None:
    budget = cli(env, "submit", *DIGITS, "-e", "tuner.examples.digits:evaluate", "--max-drop", "1.5")
    assert budget.exit_code == 1, budget.output
    assert "--max-drop: `0 <= max_drop < 1` must hold for a relative budget, but got max_drop=1.5." in budget.stderr
    assert "Value error" not in budget.stderr and "spec" not in budget.stderr
    error = json.loads(cli(env, "submit", *DIGITS, "-e", "tuner.examples.digits:evaluate", "--max-drop", "1.5",
                           "--json").stdout)["error"]
    assert error["code"] == "invalid_input" and error["field"] == "--max-drop" and error["message"].startswith("--max-drop:")

    top1 = cli(env, "submit", *DIGITS, "-e", "top1")  # top1 needs its data
    assert top1.exit_code == 1 and "--eval-data" in top1.stderr and "eval_file" not in top1.stderr, top1.stderr
    missing = cli(env, "status", "999999999", "--json")
    assert missing.exit_code == 1 and json.loads(missing.stdout)["error"]["code"] == "not_found"


def test_delete_refuses_a_running_job_until_cancelled(env: dict[str, str], running_server, wait_until) -> None:  # noqa: ANN001
    job_id = json.loads(cli(env, "submit", *DIGITS, "-e", "qt_clientcode.evals:slow", "--json").stdout)["id"]
    status = lambda: json.loads(cli(env, "status", str(job_id), "--json").stdout)["status"]  # noqa: E731
    wait_until(lambda: status() == "running", 180, message="the job to run")
    refused = cli(env, "delete", str(job_id))
    assert refused.exit_code == 1 and f"job {job_id} is running: cancel it first" in refused.stderr
    assert f"`quanttune cancel {job_id}`" in refused.stderr and "409 conflict" in refused.stderr
    assert cli(env, "cancel", str(job_id)).exit_code == 0
    deleted = cli(env, "delete", str(job_id))
    assert deleted.exit_code == 0 and deleted.stdout == f"job {job_id} deleted\n"
    gone = cli(env, "status", str(job_id))
    assert gone.exit_code == 1 and f"job {job_id} not found" in gone.stderr


def test_help_at_80_columns_shows_every_option_name_whole() -> None:
    import click
    import typer

    def commands(command: click.Command, path: list[str]):  # noqa: ANN202
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, [*path, name])

    for path, command in commands(typer.main.get_command(app), []):
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}).stdout
        words = shown.replace("│", " ").replace(",", " ").split()
        names = [n for p in command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("--")]
        assert [n for n in names if n not in words] == [], (path, shown)
        assert max(map(len, shown.splitlines())) <= 80, (path, shown)
    submit = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "80"}).stdout
    described = " ".join(submit.replace("│", " ").split())
    assert "--higher-is-better <bool> A higher score is better (accuracy; the default)." in described, described


def test_an_empty_job_list_says_so_and_counts_are_singular_for_one(env: dict[str, str], running_server) -> None:  # noqa: ANN001
    fresh = {**env, "QUANTTUNE_TOKEN": running_server.new_token("nothing yet")}
    assert cli(fresh, "jobs").stdout == "no jobs: `quanttune submit` creates one\n"
    assert cli(fresh, "jobs", "--status", "failed").stdout == "no jobs with status failed\n"
    job = json.loads(cli(fresh, "submit", *DIGITS, "-e", "tuner.examples.digits:evaluate", "--max-trials", "1",
                         "--wait", "--json").stdout)
    assert job["progress"]["trials"] == 1
    assert cli(fresh, "jobs", "--offset", "5").stdout == "no jobs past the first 5 (there are 1)\n"
    status = " ".join(cli(fresh, "status", str(job["id"])).stdout.replace("│", " ").split())
    assert "progress 1 trial: best" in status and "1 trials" not in status, status
    summary = json.loads(cli(fresh, "trials", str(job["id"]), "--json").stdout)["data"][0]["summary"]
    assert summary.startswith("4/4 int8") and "other" not in summary  # every setting named
