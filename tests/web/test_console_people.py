"""People in a real browser: an admin invites a rater, who accepts in another browser, lands on
the start page and judges one comparison with the keyboard."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from playwright.sync_api import Browser, Page, expect

from app.models import Judgment, ProjectMember
from app.services import projects, staffing, users
from tests.conftest import TEST_PASSWORD, Factory
from tests.web.conftest import LiveServer

pytestmark = pytest.mark.browser


def log_in(page: Page, email: str) -> None:
    page.goto("/login")
    page.fill("#email", email)
    page.fill("#password", TEST_PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/$"))


def test_an_invited_rater_joins_and_judges(
    page: Page, browser: Browser, live_server: LiveServer, web_factory: Factory
) -> None:
    project = projects.create_project(
        web_factory.session, "invited", "Invited project", settings={"overlap": 1, "gold_rate": 0.0}
    )
    web_factory.pair(project, texts=("Paris.", "Lyon."), prompt="The capital of France?")
    # Another rater on the staff: the project is staffed, so the invite's staffing matters.
    other = web_factory.user(email="staffed@example.com")
    staffing.add_member(web_factory.session, project, other)
    web_factory.session.commit()
    web_factory.user("admin", email="boss@example.com")

    log_in(page, "boss@example.com")
    page.goto("/admin/people")
    page.select_option("#invite-role", "rater")
    page.select_option("#invite-project", "invited")
    page.fill("#invite-note", "Grace, night shift")
    page.click("text=Create invite link")
    link = page.locator("#invite-link")
    expect(link).to_contain_text("/invite/")
    expect(page.locator("[data-copy='#invite-link']")).to_be_visible()
    url = link.inner_text().strip()
    expect(page.locator("#pending-title")).to_be_visible()
    expect(page.get_by_text("Grace, night shift")).to_be_visible()

    invited = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    invited.set_default_timeout(10_000)
    try:
        rater = invited.new_page()
        rater.goto(url)
        expect(rater.locator("h1")).to_have_text("Join Verdict")
        expect(rater.locator("#email")).to_be_focused()
        rater.keyboard.type("grace@example.com")
        rater.fill("#password", "a long password")
        rater.click("text=Create my account")
        expect(rater).to_have_url(f"{live_server.url}/")
        expect(rater.locator(".who")).to_have_text("grace@example.com · rater")
        rater.click("a[href='/p/invited/rate']")
        expect(rater).to_have_url(re.compile(r"/p/invited/rate$"))
        expect(rater.locator("#task-title")).to_be_focused()
        before = rater.locator("#task").get_attribute("data-assignment-id")
        rater.keyboard.press("1")
        rater.keyboard.press("Enter")
        rater.wait_for_function(
            "old => { const t = document.getElementById('task');"
            " return t && t.getAttribute('data-assignment-id') !== old; }",
            arg=before,
        )
        expect(rater.locator("#rate-counts")).to_contain_text("1 done today")
        # The link was single use: opening it again says so.
        again = rater.goto(url)
        assert again is not None and again.status == 410
        expect(rater.locator("h1")).to_have_text("This invite was already used")
    finally:
        invited.close()

    s = web_factory.session
    s.commit()
    grace = users.get_user_by_email(s, "grace@example.com")
    assert grace is not None and grace.role == "rater"
    judged = s.scalars(sa.select(Judgment).where(Judgment.rater_id == grace.id)).all()
    # 1 is "left much better": the response shown on the left.
    assert [(j.choice, j.strength) for j in judged] == [(judged[0].shown_left, 2)]
    assert s.scalar(
        sa.select(ProjectMember).where(
            ProjectMember.project_id == project.id, ProjectMember.user_id == grace.id
        )
    )
    # The admin's page now lists Grace, staffed on the project, and no pending invite.
    page.goto("/admin/people")
    row = page.locator("tr", has_text="grace@example.com")
    expect(row).to_contain_text("Invited project")
    expect(page.get_by_text("No pending invites.")).to_be_visible()
