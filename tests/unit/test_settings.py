"""Settings: every one is in .env.example, production refuses a weak secret and insecure
cookies, the demo keeps its generated secret."""

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


GOOD_SECRET = "kq3V9x-T7mZ_2pLw8RbNc4Hy6JdFs0Ue"  # 32 characters, 32 distinct


def test_production_refuses_a_missing_short_or_placeholder_secret() -> None:
    for weak in ("", "short", "s" * 40, "changeme" * 4, "0123456789" * 4):
        with pytest.raises(ValidationError, match="SECRET_KEY"):
            Settings(env="production", secret_key=weak, cookie_secure=True)
    assert Settings(env="production", secret_key=GOOD_SECRET, cookie_secure=True).secret_key


def test_production_refuses_insecure_cookies_unless_told_it_is_plain_http() -> None:
    with pytest.raises(ValidationError, match="VERDICT_COOKIE_SECURE=false"):
        Settings(env="production", secret_key=GOOD_SECRET, cookie_secure=False)
    allowed = Settings(
        env="production", secret_key=GOOD_SECRET, cookie_secure=False, allow_insecure_http=True
    )
    assert allowed.cookie_secure is False
    # Development never minds: the demo runs on http://127.0.0.1.
    assert Settings(secret_key="", cookie_secure=False).env == "development"


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
