"""The Data tab's Export form: the links to it, the download it answers with (the API's bytes,
audited), refusals shown at their field, and reviewers held to pseudonyms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.models import AuditEvent, Judgment, Project, User
from app.services import exports, snapshots
from tests.conftest import Factory
from tests.console.conftest import Browser

BrowserFor = Callable[[User | None], Browser]


@pytest.fixture
def project(factory: Factory) -> Project:
    project = factory.project("console-exp")
    rater = factory.user("rater", "rhea@example.com")
    for i in range(2):
        pair = factory.pair(project, (f"<b>yes</b> {i}", f"no {i}"), prompt=f"q {i}")
        factory.session.add(
            Judgment(
                project_id=project.id, pair_id=pair.id, rater_id=rater.id, choice="a", strength=1
            )
        )
    factory.session.commit()
    return project


def url(project: Project) -> str:
    return f"/admin/projects/{project.slug}/export"


def test_the_form_lists_formats_and_snapshots_and_is_linked(
    factory: Factory, session: Session, browser_for: BrowserFor, project: Project
) -> None:
    snap = snapshots.create_snapshot(session, project)
    session.commit()
    admin = browser_for(factory.user("admin"))
    data = admin.get(f"/admin/projects/{project.slug}/data")
    assert f'href="{url(project)}"' in data.text  # type: ignore[attr-defined]
    assert f'href="{url(project)}?snapshot={snap.id}"' in data.text  # type: ignore[attr-defined]
    form: Any = admin.get(f"{url(project)}?snapshot={snap.id}")
    assert form.status_code == 200
    for name in exports.FORMATS:
        assert f'name="format" value="{name}"' in form.text
    assert f'<option value="{snap.id}" selected>Snapshot #{snap.id} · 2 judgments' in form.text


def test_submitting_downloads_the_export_and_audits_it(
    factory: Factory, session: Session, browser_for: BrowserFor, project: Project
) -> None:
    user = factory.user("admin")
    admin = browser_for(user)
    answer: Any = admin.get(url(project), params={"format": "raw-csv", "snapshot": ""})
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == (
        'attachment; filename="console-exp-raw-csv.csv"'
    )
    plan = exports.prepare_export(session, project, "raw-csv", secret_key="unused")
    assert answer.content == b"".join(exports.stream_export(session, plan))
    event = session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action == "project.export")
    ).one()
    assert (event.actor_id, event.data["format"]) == (user.id, "raw-csv")


def test_refusals_are_shown_at_their_field(
    factory: Factory, browser_for: BrowserFor, project: Project
) -> None:
    admin = browser_for(factory.user("admin"))
    bad: Any = admin.get(
        url(project), params={"format": "trl", "since": "2026-12-05", "until": "2026-12-01"}
    )
    assert bad.status_code == 422
    assert (
        '<p class="field-error" id="export-since-error">must be before the end of the range</p>'
        in bad.text
    )
    assert 'value="2026-12-05"' in bad.text  # the choices are kept
    salted: Any = admin.get(
        url(project), params={"format": "hh", "pseudonymize": "on", "salt": '"><script>x()'}
    )
    assert salted.status_code == 422 and "not applicable to hh" in salted.text
    assert "<script>x()" not in salted.text and 'value="&#34;&gt;&lt;script&gt;x()"' in salted.text


def test_reviewers_export_raw_data_with_pseudonyms_only(
    factory: Factory, browser_for: BrowserFor, project: Project
) -> None:
    reviewer = browser_for(factory.user("reviewer"))
    refused: Any = reviewer.get(url(project), params={"format": "raw-jsonl"})
    assert refused.status_code == 422
    assert "as a reviewer, pseudonymise raters" in refused.text
    allowed: Any = reviewer.get(url(project), params={"format": "raw-jsonl", "pseudonymize": "on"})
    assert allowed.status_code == 200
    assert b"rhea@example.com" not in allowed.content and b'"rater":"rater-' in allowed.content
    trl: Any = reviewer.get(url(project), params={"format": "trl"})
    assert trl.status_code == 200 and b"&lt;" not in trl.content and b"<b>yes</b>" in trl.content
