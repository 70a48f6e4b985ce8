"""Console project pages: the list, creating a project, its summary, its settings form
(generated from ProjectSettings) and the guidelines' live preview."""

from __future__ import annotations

import re
from collections.abc import Callable

import sqlalchemy as sa
from fastapi import FastAPI

from app.models import AuditEvent, Project, Prompt
from app.services.projects import ProjectSettings, project_settings
from tests.conftest import Factory
from tests.console.conftest import Browser, Seeded, counted_statements


def test_an_admin_creates_a_project_from_the_form(
    seeded: Seeded, browser_for: Callable[..., Browser], factory: Factory
) -> None:
    admin = browser_for(seeded.admin)
    form = admin.get("/admin/projects/new")
    assert form.status_code == 200  # type: ignore[attr-defined]
    # Every setting of the definition is on the form.
    for name in ProjectSettings.model_fields:
        assert f'name="{name}"' in form.text, name  # type: ignore[attr-defined]
    made = admin.post(
        "/admin/projects",
        {"name": "Tone check", "slug": "tone", "guidelines": "# Be kind", "overlap": "2",
         "require_rationale.present": "1", "require_rationale": "on"},
    )  # fmt: skip
    assert made.status_code == 303 and made.headers["location"] == "/admin/projects/tone"  # type: ignore[attr-defined]
    factory.session.commit()
    project = factory.session.scalars(sa.select(Project).where(Project.slug == "tone")).one()
    settings = project_settings(project)
    assert (project.name, project.guidelines) == ("Tone check", "# Be kind")
    assert settings.overlap == 2 and settings.require_rationale is True
    assert settings.lease_ttl_s == 600  # defaults fill what the form left alone
    event = factory.session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action == "project.create")
    ).all()
    assert any(e.target_id == project.id and e.actor_id == seeded.admin.id for e in event)
    summary = admin.get(made.headers["location"])  # type: ignore[attr-defined]
    assert summary.status_code == 200 and "Project Tone check created." in summary.text  # type: ignore[attr-defined]


def test_a_bad_slug_or_setting_is_shown_at_its_field_and_nothing_is_stored(
    seeded: Seeded, browser_for: Callable[..., Browser], factory: Factory
) -> None:
    admin = browser_for(seeded.admin)
    bad = admin.post("/admin/projects", {"name": "X", "slug": "-Bad-", "overlap": "3"})
    assert bad.status_code == 422  # type: ignore[attr-defined]
    assert re.search(r'id="f-slug-error">slug .*must be 1-64 lowercase', bad.text)  # type: ignore[attr-defined]
    zero = admin.post("/admin/projects", {"name": "X", "slug": "ok", "overlap": "0"})
    assert zero.status_code == 422  # type: ignore[attr-defined]
    assert 'id="f-overlap-error"' in zero.text  # type: ignore[attr-defined]
    assert 'value="0"' in zero.text  # what was typed stays in the field  # type: ignore[attr-defined]
    taken = admin.post("/admin/projects", {"name": "X", "slug": seeded.project.slug})
    assert taken.status_code == 409 or taken.status_code == 422  # type: ignore[attr-defined]
    factory.session.commit()
    assert factory.count(Project) == 1


def test_settings_are_saved_and_errors_stay_at_their_field(
    seeded: Seeded, browser_for: Callable[..., Browser], factory: Factory
) -> None:
    admin = browser_for(seeded.admin)
    path = f"/admin/projects/{seeded.project.slug}/settings"
    saved = admin.post(
        path,
        {"name": "Renamed", "guidelines": "Judge *tone*.", "gold_rate": "0.2",
         "loop_ppo_config": '{"total_steps": 5}', "auto_mode.present": "1"},
    )  # fmt: skip
    assert saved.status_code == 303  # type: ignore[attr-defined]
    factory.session.expire_all()
    project = factory.session.get(Project, seeded.project.id)
    assert project is not None and project.name == "Renamed"
    ps = project_settings(project)
    assert ps.gold_rate == 0.2 and ps.loop_ppo_config == {"total_steps": 5}
    assert ps.auto_mode is False  # the checkbox was on the form, unticked
    factory.session.commit()

    refused = admin.post(path, {"loop_ppo_config": '{"total_steps": 0}', "gold_rate": "0.5"})
    assert refused.status_code == 422  # type: ignore[attr-defined]
    assert 'id="f-loop_ppo_config-error"' in refused.text  # type: ignore[attr-defined]
    assert "total_steps: Input should be greater than or equal to 1" in refused.text  # type: ignore[attr-defined]
    factory.session.expire_all()
    project = factory.session.get(Project, seeded.project.id)
    assert project is not None and project_settings(project).gold_rate == 0.2  # nothing half-saved


def test_reviewers_see_the_settings_without_a_way_to_change_them(
    seeded: Seeded, browser_for: Callable[..., Browser]
) -> None:
    body = browser_for(seeded.reviewer).get(f"/admin/projects/{seeded.project.slug}/settings").text  # type: ignore[attr-defined]
    assert "Save settings" not in body and "readonly" in body
    assert "New project" not in browser_for(seeded.reviewer).get("/admin/projects").text  # type: ignore[attr-defined]


def test_the_guidelines_preview_is_sanitised_like_the_rater_view(
    seeded: Seeded, browser_for: Callable[..., Browser]
) -> None:
    admin = browser_for(seeded.admin)
    preview = admin.post(
        f"/admin/projects/{seeded.project.slug}/guidelines/preview",
        {"guidelines": "**bold** <script>alert(1)</script> <img src=x onerror=alert(1)>"},
    )
    assert preview.status_code == 200  # type: ignore[attr-defined]
    assert "<strong>bold</strong>" in preview.text  # type: ignore[attr-defined]
    assert "<script" not in preview.text and "<img" not in preview.text  # type: ignore[attr-defined]


def test_project_pages_cost_the_same_statements_for_few_and_many_rows(
    seeded: Seeded, browser_for: Callable[..., Browser], factory: Factory, app: FastAPI
) -> None:
    admin = browser_for(seeded.admin)
    paths = ["/admin", "/admin/projects", f"/admin/projects/{seeded.project.slug}"]

    def statements() -> list[int]:
        counts = []
        for path in paths:
            with counted_statements(app.state.engine) as seen:
                assert admin.get(path).status_code == 200  # type: ignore[attr-defined]
            counts.append(len(seen))
        return counts

    few = statements()
    for i in range(20):
        factory.pair(seeded.project, (f"a{i}", f"b{i}"), prompt=f"question {i}?")
    factory.session.add(Prompt(project_id=seeded.project.id, text="lonely", source="test"))
    factory.session.commit()
    assert statements() == few
