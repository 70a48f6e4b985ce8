"""`verdict export`, run as a real subprocess: the file the API would stream, what `verdict
import` reads back into a new project, audited, and bad parameters reported without a file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.models import AuditEvent, Judgment, Project
from app.services import exports
from tests.conftest import Factory, run_verdict


def verdict(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VERDICT_DATABASE_URL": db_url, "VERDICT_VAR_DIR": str(tmp_path / "var")}
    return run_verdict(*args, env=env)


def comparisons(session: Session, project: Project) -> list[tuple[str, str, str]]:
    plan = exports.prepare_export(session, project, "trl", secret_key="unused")
    rows = [json.loads(x) for x in b"".join(exports.stream_export(session, plan)).splitlines()]
    return sorted(
        (json.dumps(r["prompt"]), r["chosen"][0]["content"], r["rejected"][0]["content"])
        for r in rows
    )


@pytest.mark.parametrize(("fmt", "import_as"), [("trl", "auto"), ("trl", "trl"), ("hh", "hh-rlhf")])
def test_export_then_import_into_a_new_project_gives_the_same_comparisons(
    db_url: str, tmp_path: Path, factory: Factory, session: Session, fmt: str, import_as: str
) -> None:
    source = factory.project("cli-a")
    rater = factory.user("rater")
    for i, choice in enumerate(("a", "b", "a")):
        pair = factory.pair(source, (f"first {i}", f"second {i}"), prompt=f"Prompt {i}?")
        session.add(
            Judgment(project_id=source.id, pair_id=pair.id, rater_id=rater.id, choice=choice,
                     strength=2 if i else 1)
        )  # fmt: skip
    session.commit()
    factory.project("cli-b")
    out = tmp_path / f"export.{fmt}.jsonl"
    done = verdict(db_url, tmp_path, "export", "cli-a", "--format", fmt, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert f"({fmt}) to {out}" in done.stderr
    assert len(out.read_bytes().splitlines()) == 3
    imported = verdict(
        db_url, tmp_path, "import", str(out), "--project", "cli-b",
        "--format", import_as, "--source", "round-trip",
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert "created 3" in imported.stdout
    target = session.scalars(sa.select(Project).where(Project.slug == "cli-b")).one()
    assert comparisons(session, target) == comparisons(session, source)
    session.commit()
    event = session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action == "project.export")
    ).one()
    assert (event.actor_id, event.project_id, event.data["format"]) == (None, source.id, fmt)


def test_stdout_and_bad_parameters(db_url: str, tmp_path: Path, factory: Factory) -> None:
    project = factory.project("cli-c")
    pair = factory.pair(project, ("=cmd|' /C calc'!A0", "fine"))
    factory.session.add(
        Judgment(project_id=project.id, pair_id=pair.id, source="x", choice="a", strength=1)
    )
    factory.session.commit()
    shown = verdict(db_url, tmp_path, "export", "cli-c", "--format", "raw-csv", "-o", "-")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("\ufeffjudgment_id,created_at")
    bad = verdict(db_url, tmp_path, "export", "cli-c", "--format", "xlsx", "-o", "-")
    assert bad.returncode == 1 and bad.stdout == ""
    assert "unknown export format 'xlsx'" in bad.stderr and "Traceback" not in bad.stderr
    dates = verdict(db_url, tmp_path, "export", "cli-c", "--since", "2026-12-02", "--until", "2026")
    assert dates.returncode == 1 and "until" in dates.stderr
    assert list(Path.cwd().glob("cli-c-*")) == []


def test_the_format_option_names_every_format_of_the_table() -> None:
    from typing import get_type_hints

    from app.cli import export_data

    option = get_type_hints(export_data, include_extras=True)["format"].__metadata__[0]
    assert option.help == ", ".join(list(exports.FORMATS)[:-1]) + " or " + list(exports.FORMATS)[-1]


def test_it_checks_the_database_first(tmp_path: Path) -> None:
    from tests.unit.test_cli import verdict_without_config

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = verdict_without_config(cwd, "export", "p", "--format", "trl")
    assert result.returncode == 1, result.stderr
    assert "no database file at" in result.stderr and "Traceback" not in result.stderr
    assert list(cwd.iterdir()) == []
