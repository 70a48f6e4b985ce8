"""The Models tab in a real browser: an admin promotes a candidate from its version page and rolls
back again (confirm dialogs, the rows and the audit events left), and the playground answers a
prompt with the base policy on a real worker, the answer appearing without a reload."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from playwright.sync_api import Dialog, Page, expect

from app.core.config import Settings
from app.models import AuditEvent, ModelVersion, Run
from app.services import projects, registry
from tests.conftest import TEST_PASSWORD, Factory
from tests.web.conftest import LiveServer
from tests.workers.conftest import CeleryProcess

pytestmark = pytest.mark.browser


def log_in(page: Page, email: str) -> None:
    page.goto("/login")
    page.fill("#email", email)
    page.fill("#password", TEST_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")


def _statuses(factory: Factory, *ids: int) -> list[str]:
    factory.session.rollback()
    factory.session.expire_all()
    rows = {
        v.id: v.status
        for v in factory.session.scalars(sa.select(ModelVersion).where(ModelVersion.id.in_(ids)))
    }
    return [rows[i] for i in ids]


def test_admin_promotes_a_candidate_then_rolls_back(page: Page, web_factory: Factory) -> None:
    s = web_factory.session
    admin = web_factory.user("admin", email="promoter@example.com")
    project = projects.create_project(s, "promote-web", "Promotions", settings={"base_policy": "b"})
    base = ModelVersion(project_id=project.id, kind="policy", version=0, name="base (b)",
                        base_model="b", status="active")  # fmt: skip
    s.add(base)
    s.flush()
    candidate = ModelVersion(
        project_id=project.id, kind="policy", version=1, name="ppo v1", base_model="b",
        artifact_path="/artifacts/p1", parent_id=base.id, status="candidate",
        metrics={"score_gain": 0.2, "kl_to_parent": 1.0,
                 "promotion_rule": {"passed": True, "reason": "score gain +0.2 >= 0"}},
    )  # fmt: skip
    s.add(candidate)
    s.commit()
    questions: list[str] = []

    def accept(dialog: Dialog) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    log_in(page, admin.email)

    page.goto(f"/admin/projects/{project.slug}/models")
    page.get_by_role("link", name="v1", exact=True).first.click()
    expect(page).to_have_url(re.compile(rf"/admin/models/{candidate.id}$"))
    # The reason is required: the browser refuses to send the form without one.
    page.get_by_role("button", name="Promote v1").click()
    assert _statuses(web_factory, candidate.id) == ["candidate"]
    page.fill("#reason", "wins on held-out prompts")
    page.uncheck("#generate")
    page.get_by_role("button", name="Promote v1").click()
    expect(page.locator(".flash")).to_contain_text("Policy v1 is active now; v0 is archived.")
    expect(page.locator(".version-head .badge")).to_have_text("active")
    assert questions == ["Promote policy v1 (archiving v0)?"]
    assert _statuses(web_factory, candidate.id, base.id) == ["active", "archived"]

    # Back to v0 from its own page, following the parent chain.
    page.locator(".chain.parents").get_by_role("link", name=re.compile("Policy v0")).click()
    expect(page).to_have_url(re.compile(rf"/admin/models/{base.id}$"))
    page.fill("#reason", "v1 rambles")
    page.get_by_role("button", name="Roll back to v0").click()
    expect(page.locator(".flash")).to_contain_text("Policy v0 is active now; v1 is archived")
    assert questions[-1] == "Roll back to policy v0 (archiving v1)?"
    assert _statuses(web_factory, base.id, candidate.id) == ["active", "archived"]

    events = web_factory.session.scalars(
        sa.select(AuditEvent)
        .where(AuditEvent.action.in_(("model.promote", "model.rollback")))
        .order_by(AuditEvent.id)
    ).all()
    assert [(e.action, e.target_id, e.actor_id, e.data["reason"]) for e in events] == [
        ("model.promote", candidate.id, admin.id, "wins on held-out prompts"),
        ("model.rollback", base.id, admin.id, "v1 rambles"),
    ]
    # The rollback asked for a generation run by v0 (the checkbox is on by default).
    generate = web_factory.session.scalars(sa.select(Run).where(Run.kind == "generate")).all()
    assert len(generate) == 1


@pytest.mark.worker
def test_playground_answers_with_the_base_policy_without_a_reload(
    page: Page,
    web_factory: Factory,
    live_server: LiveServer,
    live_worker: CeleryProcess,
    tiny_model: Path,
) -> None:
    s = web_factory.session
    admin = web_factory.user("admin", email="player@example.com")
    project = projects.create_project(
        s, "play-web", "Playground", settings={"base_policy": str(tiny_model)}
    )
    base = registry.ensure_base_policy(s, project, Settings(database_url=live_server.database_url))
    s.commit()
    log_in(page, admin.email)

    page.goto(f"/admin/projects/{project.slug}/playground")
    expect(page.locator("#gen-version")).to_have_value(str(base.id))
    page.evaluate("window.stillHere = true")  # gone if the page reloads
    page.fill("#gen-prompt", "Say something short.")
    page.locator("details.knobs summary").click()
    page.fill("#f-max_new_tokens", "6")
    page.fill("#f-num_responses", "2")
    page.get_by_role("button", name="Generate").click()

    answer = page.locator("#generate-card .answer")
    expect(answer).to_be_visible()
    expect(answer).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(answer.locator(".response")).to_have_count(2)
    assert page.evaluate("window.stillHere") is True
    expect(page.locator("#gen-prompt")).to_have_value("Say something short.")

    web_factory.session.rollback()
    run = s.scalars(sa.select(Run).where(Run.kind == "sample")).one()
    assert (run.status, run.config["model_version_id"], run.config["max_new_tokens"]) == (
        "succeeded", base.id, 6,
    )  # fmt: skip
    answers = run.result["responses"]
    assert len(answers) == 2 and all(1 <= a["tokens"] <= 6 for a in answers)
    # Each answer cut at the 6-token limit says so (a random tiny model rarely stops by itself).
    cut = sum(bool(a["truncated"]) for a in answers)
    expect(answer.locator(".badge.cut")).to_have_count(cut)
    expect(answer.locator(".badge.cut").first).to_have_text("cut off at the token limit")
