"""The `verdict` command line, run as a real subprocess against the test databases."""

import json
import os
import subprocess
import sys
from pathlib import Path

from app.models import Prompt
from tests.conftest import Factory


def verdict(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VERDICT_DATABASE_URL": db_url, "VERDICT_VAR_DIR": str(tmp_path / "var")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_user_token_project_and_import(db_url: str, tmp_path: Path, factory: Factory) -> None:
    created = verdict(
        db_url,
        tmp_path,
        "user",
        "create",
        "--email",
        "Ops@Example.com",
        "--password",
        "long enough pw",
        "--role",
        "admin",
    )
    assert created.returncode == 0, created.stderr
    assert "ops@example.com" in created.stdout

    token = verdict(
        db_url, tmp_path, "token", "create", "--email", "ops@example.com", "--name", "ci"
    )
    assert token.returncode == 0, token.stderr
    last_line = token.stdout.strip().splitlines()[-1]
    assert last_line.startswith("vd_") and " " not in last_line

    project = verdict(db_url, tmp_path, "project", "create", "--slug", "cli", "--name", "CLI")
    assert project.returncode == 0, project.stderr

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "external_id": "g1"}) + "\n")
    imported = verdict(db_url, tmp_path, "prompts", "import", str(good), "--project", "cli")
    assert imported.returncode == 0, imported.stderr
    assert "created 1, duplicates 0" in imported.stdout
    assert factory.count(Prompt) == 1


def test_import_reports_errors_with_line_numbers_and_stores_nothing(
    db_url: str, tmp_path: Path, factory: Factory
) -> None:
    factory.project("cli")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": ""}\n{"messages": [{"role": "bot"}]}\n')
    result = verdict(db_url, tmp_path, "prompts", "import", str(bad), "--project", "cli")
    assert result.returncode == 1
    assert "line 2, prompt: must not be empty" in result.stderr
    assert "line 3, messages[0].role: unknown role 'bot'" in result.stderr
    assert factory.count(Prompt) == 0


def test_errors_are_clear_not_tracebacks(db_url: str, tmp_path: Path, factory: Factory) -> None:
    factory.user("rater", email="taken@example.com")
    dup = verdict(
        db_url,
        tmp_path,
        "user",
        "create",
        "--email",
        "taken@example.com",
        "--password",
        "long enough pw",
    )
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert "Traceback" not in dup.stderr
    missing = verdict(
        db_url, tmp_path, "token", "create", "--email", "nobody@example.com", "--name", "x"
    )
    assert missing.returncode == 1 and "no user" in missing.stderr
