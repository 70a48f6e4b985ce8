"""What a new user ran into, in a real browser: no CSP violation or script error on the rater
page's submit, skip and dialogs, nor on the API docs; an HTML 404 with a way back; the icon; the
rater page while answers are still being written; answers cut off at the token limit marked."""

from __future__ import annotations

import pytest
from playwright.sync_api import ConsoleMessage, Page, expect

from app.models import ComparisonPair, Prompt, Response, Run, utcnow
from app.services import projects
from tests.conftest import Factory
from tests.web.test_rating import login_with_keyboard, press_and_wait_for_next

pytestmark = pytest.mark.browser


def watch_console(page: Page) -> list[str]:
    problems: list[str] = []

    def seen(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"{message.type}: {message.text}")

    page.on("console", seen)
    page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    return problems


def add_pair(factory: Factory, project_id: int, n: int, *, truncated: bool = False) -> None:
    s = factory.session
    prompt = Prompt(project_id=project_id, text=f"Question {n}?", source="test")
    s.add(prompt)
    s.flush()
    a = Response(prompt_id=prompt.id, text=f"Short answer {n}.", model_name="m")
    b = Response(prompt_id=prompt.id, text=f"A long answer {n} that", model_name="m",
                 truncated=truncated)  # fmt: skip
    s.add_all([a, b])
    s.flush()
    s.add(ComparisonPair(project_id=project_id, prompt_id=prompt.id, response_a_id=a.id,
                         response_b_id=b.id, required_judgments=1))  # fmt: skip
    s.commit()


def test_the_rater_page_and_the_docs_raise_no_console_error(
    page: Page, web_factory: Factory
) -> None:
    project = projects.create_project(
        web_factory.session, "clean", "Clean", settings={"overlap": 1}
    )
    web_factory.session.commit()
    for n in range(4):
        add_pair(web_factory, project.id, n, truncated=n == 0)
    web_factory.user(email="clean@example.com")
    problems = watch_console(page)
    login_with_keyboard(page, "clean@example.com", "clean")
    if page.locator(".cut-badge").count() == 0:  # the cut-off answer is on the first pair
        press_and_wait_for_next(page, "3", "Enter")
    expect(page.locator(".cut-badge").first).to_have_text("cut off at the token limit")
    press_and_wait_for_next(page, "1", "Enter")
    press_and_wait_for_next(page, "s", "2", "Enter")  # skip, with the second reason
    page.keyboard.press("?")
    page.keyboard.press("Escape")
    page.keyboard.press("g")
    page.keyboard.press("Escape")
    page.goto("/docs")
    expect(page.locator(".docs-bar a").first).to_have_text("← Back to Verdict")
    expect(page.locator("button.authorize")).to_be_visible()  # a token can be given
    assert problems == []


def test_an_unknown_url_is_an_html_page_with_a_way_back(page: Page, web_factory: Factory) -> None:
    web_factory.user(email="lost@example.com")
    response = page.goto("/no/such/page")
    assert response is not None and response.status == 404
    expect(page.locator("h1")).to_have_text("Page not found")
    expect(page.locator(".error-actions a").first).to_have_attribute("href", "/")
    icon = page.request.get("/favicon.ico", max_redirects=0)
    assert icon.status == 301 and icon.headers["location"] == "/static/favicon.svg"
    assert page.request.get("/api/v1/no-such").json() == {"detail": "Not Found"}  # the API: JSON


def test_the_rater_page_says_when_answers_are_being_written(
    page: Page, web_factory: Factory
) -> None:
    project = projects.create_project(web_factory.session, "writing", "Writing")
    web_factory.session.commit()
    web_factory.session.add(
        Run(project_id=project.id, kind="generate", status="running", trigger="upload",
            config={}, progress_done=17, progress_total=55, started_at=utcnow())
    )  # fmt: skip
    web_factory.session.commit()
    web_factory.user(email="early@example.com")
    page.goto("/p/writing/rate")
    expect(page.locator("#email")).to_be_focused()  # autofocus, once the page has loaded
    page.keyboard.type("early@example.com")
    page.keyboard.press("Tab")
    page.keyboard.type("correct horse battery")
    page.keyboard.press("Enter")
    expect(page.locator("#task-title")).to_have_text("Answers are being written")
    expect(page.locator("#task")).to_contain_text("17 of 55")
    expect(page.locator("#task")).to_have_attribute("hx-trigger", "every 5s")  # refreshes itself
