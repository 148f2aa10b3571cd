"""Settings come from `QUANTTUNE_*` environment variables, CLI overrides win, references stay
inside the allowed module prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import DisallowedReferenceError
from worker.references import is_allowed, resolve
from worker.settings import get_settings


def test_environment_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUANTTUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("QUANTTUNE_ALLOWED_MODULES", "tuner.examples, mycompany.models ,")
    monkeypatch.setenv("QUANTTUNE_LEASE_SECONDS", "12")
    settings = get_settings()
    assert settings.allowed_modules == ["tuner.examples", "mycompany.models"]
    assert settings.db_url == f"sqlite:///{tmp_path.resolve() / 'quanttune.db'}"
    assert (settings.lease_seconds, settings.heartbeat_interval) == (12, 4)
    monkeypatch.setenv("QUANTTUNE_DB", "postgresql://u:p@h/db")
    assert get_settings().db_url == "postgresql+psycopg://u:p@h/db"  # psycopg 3, the driver we ship
    assert get_settings(db="sqlite:///x.db", data_dir=None).db_url == "sqlite:///x.db"


def test_references_resolve_only_inside_allowed_prefixes() -> None:
    assert is_allowed("tuner.examples.digits", ["tuner.examples"])
    assert is_allowed("tuner.examples", ["tuner.examples"])
    assert not is_allowed("tuner.examples_evil", ["tuner.examples"])
    assert not is_allowed("tuner", ["tuner.examples"])
    from tuner.examples import digits

    assert resolve("tuner.examples.digits:evaluate", ["tuner.examples"], field="f") is digits.evaluate
    assert resolve("tuner.examples.digits:DigitsNet.forward", ["tuner.examples"], field="f") is digits.DigitsNet.forward
    for reference in ("os:system", "builtins:eval", "tuner.examples.digits:_splits", "tuner.examples.digits:np.load",
                      "tuner.examples.digits:torch.load", "tuner.examples.digits:nn.Linear"):
        with pytest.raises(DisallowedReferenceError) as caught:
            resolve(reference, ["tuner.examples"], field="spec.evaluate")
        assert caught.value.field == "spec.evaluate" and reference in caught.value.message
