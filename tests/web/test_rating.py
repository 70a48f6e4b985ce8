"""The rating page in a real browser: keyboard-only judging, in-place errors, inert XSS."""

from __future__ import annotations

import os
import re
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from playwright.sync_api import ConsoleMessage, Dialog, Page, Request, expect

from app.core.config import ROOT_DIR
from app.models import Assignment, Judgment, Project, Prompt, utcnow
from app.services import assignment as assignment_service
from app.services import judgments, projects
from app.web.rate import SKIP_REASONS
from tests.conftest import TEST_PASSWORD, Factory
from tests.web.conftest import LiveServer

pytestmark = pytest.mark.browser

SCREENSHOT = ROOT_DIR / "docs" / "screenshots" / "rating.png"


def login_with_keyboard(page: Page, email: str, slug: str) -> None:
    page.goto(f"/p/{slug}/rate")
    expect(page).to_have_url(re.compile(r"/login\?next=/p/"))
    # The email field has autofocus; typing before the page gave it focus loses keystrokes.
    expect(page.locator("#email")).to_be_focused()
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    page.keyboard.type(TEST_PASSWORD)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(f"/p/{slug}/rate$"))
    # rate.js focuses the comparison once it runs: from then on every key works
    expect(page.locator("#task-title")).to_be_focused()


def task_id(page: Page) -> str | None:
    return page.locator("#task").get_attribute("data-assignment-id")


def press_and_wait_for_next(page: Page, *keys: str) -> None:
    before = task_id(page)
    for key in keys:
        page.keyboard.press(key)
    page.wait_for_function(
        "old => { const t = document.getElementById('task');"
        " return t && t.getAttribute('data-assignment-id') !== old; }",
        arg=before,
    )
    # focus moves to the new comparison, so the keys work at once
    expect(page.locator("#task-title")).to_be_focused()


def test_keyboard_only_judging_skip_and_flag(
    page: Page, web_factory: Factory, tmp_path: Path
) -> None:
    project = projects.create_project(
        web_factory.session,
        "kb",
        "Keyboard project",
        guidelines="## Guidelines\n\nPrefer the **correct** answer.",
        settings={"overlap": 1, "gold_rate": 0.0},
    )
    for i in range(5):
        web_factory.pair(
            project,
            texts=(
                f"Answer **{i}** with code:\n\n```python\nprint({i})\n```",
                f"Another answer {i}",
            ),
            prompt=f"Question {i}: how do I print a number in Python?",
        )
    rater = web_factory.user(email="kb@example.com")
    login_with_keyboard(page, "kb@example.com", "kb")
    expect(page.locator("#rate-counts")).to_contain_text("0 done today")
    expect(page.locator("#rate-counts")).to_contain_text("5 left")
    expect(page.locator("#task-title")).to_be_focused()

    shot = tmp_path / "rating.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("VERDICT_UPDATE_SCREENSHOTS"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT)

    # help and guidelines open with one key and close with Esc
    page.keyboard.press("?")
    expect(page.locator("#help-dialog")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#help-dialog")).to_be_hidden()
    page.keyboard.press("g")
    expect(page.locator("#guidelines-dialog")).to_contain_text("Prefer the correct answer")
    page.keyboard.press("Escape")
    expect(page.locator("#guidelines-dialog")).to_be_hidden()

    # 1: A much better
    press_and_wait_for_next(page, "1", "Enter")
    # 2: flag it unsafe, B better, with a rationale
    page.keyboard.press("f")
    page.keyboard.press("Space")
    page.keyboard.press("4")
    page.keyboard.press("r")
    page.keyboard.type("B is safer")
    page.keyboard.press("Escape")
    press_and_wait_for_next(page, "Enter")
    # 3: skip, with the second reason
    page.keyboard.press("s")
    expect(page.locator("#skip-dialog")).to_be_visible()
    press_and_wait_for_next(page, "ArrowDown", "Enter")
    # 4: both bad; 5: about the same
    press_and_wait_for_next(page, "0", "Enter")
    expect(page.locator("#rate-counts")).to_contain_text("3 done today")
    press_and_wait_for_next(page, "3", "Enter")
    expect(page.locator("#task-title")).to_have_text("Nothing left for you right now")
    expect(page.locator("#rate-counts")).to_contain_text("4 done today")
    expect(page.locator("#rate-counts")).to_contain_text("0 left")

    session = web_factory.session
    rows = session.execute(
        sa.select(Judgment, Assignment)
        .join(Assignment, Judgment.assignment_id == Assignment.id)
        .where(Judgment.rater_id == rater.id)
        .order_by(Judgment.id)
    ).all()
    assert len(rows) == 4
    for (judgment, assignment), scale in zip(rows, (1, 4, 0, 3), strict=True):
        expected = judgments.from_screen(assignment.shown_left, scale)
        assert (judgment.choice, judgment.strength) == (expected.choice, expected.strength)
        assert judgment.shown_left == assignment.shown_left
        assert judgment.time_on_task_ms is not None and judgment.active_ms is not None
    flagged = rows[1][0]
    assert flagged.flags == ["unsafe"] and flagged.rationale == "B is safer"
    assert [r[0].flags for r in rows].count([]) == 3
    skipped = session.scalars(sa.select(Assignment).where(Assignment.status == "skipped")).all()
    assert [(a.rater_id, a.skip_reason) for a in skipped] == [(rater.id, SKIP_REASONS[1])]


def test_expired_and_full_keeps_what_the_rater_typed(page: Page, web_factory: Factory) -> None:
    project = web_factory.project("late", overlap=1, gold_rate=0.0)
    web_factory.pair(project)
    web_factory.pair(project)
    web_factory.user(email="late@example.com")
    login_with_keyboard(page, "late@example.com", "late")
    page.keyboard.press("r")
    page.keyboard.type("my careful reasoning")
    page.keyboard.press("Escape")
    page.keyboard.press("2")

    # meanwhile the lease runs out and another rater judges the pair
    session = web_factory.session
    mine = session.scalars(sa.select(Assignment)).one()
    session.execute(sa.update(Assignment).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    other = web_factory.user()
    project_row = session.get(Project, project.id)
    assert project_row is not None
    theirs = assignment_service.next_assignment(session, project_row, other)
    session.commit()
    assert theirs is not None and theirs.pair_id == mine.pair_id
    judgments.submit(session, theirs.id, other, judgments.JudgmentInput(choice="tie"))
    session.commit()

    page.keyboard.press("Enter")
    status = page.locator("#task-status")
    expect(status).to_contain_text("ran out")
    expect(page.locator("#rationale")).to_have_value("my careful reasoning")
    expect(page.locator('input[name="scale"][value="2"]')).to_be_checked()
    next_button = status.get_by_role("button", name="Go to the next comparison")
    expect(next_button).to_be_focused()
    before = task_id(page)
    page.keyboard.press("Enter")
    page.wait_for_function(
        "old => document.getElementById('task').getAttribute('data-assignment-id') !== old",
        arg=before,
    )
    session.rollback()
    assert session.scalar(sa.select(sa.func.count()).select_from(Judgment)) == 1


XSS_CORPUS = [
    "<script>window.__pwned = 'script'</script>",
    "<img src=x onerror=\"window.__pwned = 'img'\">",
    "<a href=\"javascript:window.__pwned = 'href'\">html link</a>",
    "[md link](javascript:window.__pwned='md')",
    '<div hx-get="/api/v1/projects" hx-trigger="load">hx-get div</div>',
    "<button hx-on:click=\"window.__pwned = 'hx-on'\">hx-on button</button>",
    '<p data-hx-get="/api/v1/projects" data-hx-trigger="load">data-hx</p>',
    '<svg onload="window.__pwned = \'svg\'"></svg><iframe src="https://evil.example/"></iframe>',
    "![pixel](https://evil.example/pixel.png)",
    "{{7*7}} and ${7*7} and #{7*7}",
    "</textarea><script>window.__pwned = 'textarea'</script>",
    "<style>body { background: url('https://evil.example/bg') }</style>",
    "مرحبا، هذه إجابة باللغة العربية. שלום עולם",
    "Emoji 🎉🔥👩‍💻 and a ZWJ family 👨‍👩‍👧",
]
BIG = "Long answer. " * 4_000 + "<script>window.__pwned='big'</script>"  # ~52 KB


def test_xss_corpus_renders_inert(
    page: Page, web_factory: Factory, live_server: LiveServer
) -> None:
    project = web_factory.project("xss", overlap=1, gold_rate=0.0)
    hostile = "\n\n".join(XSS_CORPUS)
    session = web_factory.session
    first = web_factory.pair(project, texts=(hostile, BIG), prompt=hostile)
    prompt = session.get(Prompt, first.prompt_id)
    assert prompt is not None
    prompt.messages = [
        {"role": "system", "content": hostile},
        {"role": "user", "content": hostile},
    ]
    session.commit()
    for payload in XSS_CORPUS[:4]:
        web_factory.pair(project, texts=(payload, "plain"), prompt=payload)
    web_factory.user(email="xss@example.com")

    dialogs: list[str] = []
    requests: list[str] = []
    csp_reports: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    def on_request(request: Request) -> None:
        requests.append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Refused" in message.text:
            csp_reports.append(message.text)

    page.on("dialog", on_dialog)
    page.on("request", on_request)
    page.on("console", on_console)
    page.add_init_script("window.alert = (m) => { window.__pwned = 'alert:' + m; };")

    login_with_keyboard(page, "xss@example.com", "xss")
    body = page.locator(".response-body").first
    expect(body).to_be_visible()
    # template syntax stays text (markdown may italicize the *): nothing evaluated it
    expect(page.locator("#task")).to_contain_text("{{7")
    assert "49" not in page.locator("#task").inner_text()
    judged = 0
    while task_id(page) is not None:
        # hover and click every link: none may run code or leave the page for a bad URL
        for link in page.locator("#task .md a").all():
            href = link.get_attribute("href") or ""
            assert re.match(r"(https?:|mailto:)", href), href
        page.mouse.move(10, 10)
        press_and_wait_for_next(page, "3", "Enter")
        judged += 1
    assert judged == 5

    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    assert csp_reports == []
    allowed = re.compile(
        re.escape(live_server.url) + r"/(login(\?.*)?|p/xss/rate(/\d+|/next)?|static/[\w./-]+)$"
    )
    strays = [url for url in requests if not allowed.match(url)]
    assert strays == []
    # the htmx attributes in the corpus never fired a request
    assert not any("/api/" in url for url in requests)
    assert web_factory.count(Judgment) == 5


def test_usable_at_200_percent_zoom(page: Page, web_factory: Factory) -> None:
    project = web_factory.project("zoom", overlap=1)
    web_factory.pair(project, texts=("x" * 3000, "```\n" + "y" * 400 + "\n```"))
    web_factory.user(email="zoom@example.com")
    # 200 % zoom of a 1280 px window is a 640 px wide layout
    page.set_viewport_size({"width": 640, "height": 800})
    login_with_keyboard(page, "zoom@example.com", "zoom")
    left, right = page.locator(".response").all()
    box_left, box_right = left.bounding_box(), right.bounding_box()
    assert box_left and box_right and box_right["y"] > box_left["y"] + box_left["height"] - 1
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    press_and_wait_for_next(page, "5", "Enter")
