"""Settings: every one is in .env.example, production refuses a weak secret, the demo keeps
its generated secret."""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import ROOT_DIR, Settings


def test_env_example_lists_every_setting() -> None:
    text = (ROOT_DIR / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*(VERDICT_[A-Z0-9_]+)=", text, flags=re.M))
    expected = {f"VERDICT_{name.upper()}" for name in Settings.model_fields}
    assert listed == expected, {"missing": expected - listed, "unknown": listed - expected}


def test_production_refuses_a_missing_or_short_secret() -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(env="production", secret_key="")
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(env="production", secret_key="short")
    assert Settings(env="production", secret_key="s" * 40).secret_key == "s" * 40


def test_embedded_defaults_live_under_var_dir(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path, database_url="", broker_url="", artifacts_dir=Path(""))
    assert settings.database_url == f"sqlite:///{tmp_path / 'verdict.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    assert settings.artifacts_dir == tmp_path / "artifacts"


def test_demo_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    first = Settings(var_dir=tmp_path, secret_key="").resolved_secret_key()
    second = Settings(var_dir=tmp_path, secret_key="").resolved_secret_key()
    assert first == second and len(first) >= 32
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERDICT_MAX_UPLOAD_RECORDS", "7")
    assert Settings().max_upload_records == 7
