"""docker-compose.yml and the Dockerfile, checked offline (there is no Docker engine here):
the compose spec's JSON schema, the service wiring, and that every quanttune command they run
parses with the real CLI."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def test_compose_file_matches_the_compose_spec() -> None:
    exe = shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install -c constraints.txt -e '.[test]')")
    done = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _cli():  # noqa: ANN202
    import typer

    from api.cli import app

    return typer.main.get_command(app)


def _parses(args: list[str]) -> None:
    """Resolve `args` down the command groups, then parse the leaf command's options."""
    command, name, rest, parent = _cli(), "quanttune", list(args), None
    while hasattr(command, "resolve_command"):  # a group: the first argument names the subcommand
        context = command.make_context(name, rest[:1], parent=parent)
        name, command, _ = command.resolve_command(context, rest[:1])
        rest, parent = rest[1:], context
    command.make_context(name, rest, parent=parent)  # raises on an unknown option or a bad value


def test_compose_wiring() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "migrate", "api", "worker"}
    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["db"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker  # `--scale worker=N` works
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert env["QUANTTUNE_DB"].startswith("postgresql+psycopg://") and "@db:5432/" in env["QUANTTUNE_DB"]
        assert env["QUANTTUNE_CODE_DIRS"] == "/code"  # the user's code: mounted, on the import path
        assert any(v["target"] == "/code" and v["read_only"] for v in services[name]["volumes"])
        command = services[name]["command"]
        assert command[0] == "quanttune"
        _parses(command[1:])
    assert services["migrate"]["command"][1] == "migrate" and services["worker"]["command"][1] == "worker"


def test_dockerfile_commands_parse() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD "))
    args = yaml.safe_load(cmd[4:])  # the JSON-array form
    assert args[0] == "quanttune"
    _parses(args[1:])
    _parses(["token", "create", "--name", "me"])  # what the compose file's header tells users to run
    assert "-c constraints.txt" in dockerfile  # torch stays pinned in the image too
    with pytest.raises(Exception):  # noqa: B017  (the parser check above can fail)
        _parses(shlex.split("serve --no-such-option"))
