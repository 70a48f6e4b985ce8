"""The Data tab in a real browser: a project created from the form, a file dropped on its
upload page, its line errors shown next to its name with nothing stored, then a good file, its
prompts in the browser, a search swapped in place and a prompt's page. No CSP violation on the
way."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import FilePayload, Page, expect

from app.models import Prompt
from tests.conftest import TEST_PASSWORD, Factory

pytestmark = pytest.mark.browser


def drop_file(page: Page, selector: str, name: str, text: str = "", size: int = 0) -> None:
    """Drop a file (`text`, or `size` zero bytes) on `selector` the way a person dragging it
    from their desktop does."""
    transfer = page.evaluate_handle(
        "([name, text, size]) => { const t = new DataTransfer();"
        " const body = size ? new Uint8Array(size) : text;"
        " t.items.add(new File([body], name, {type: 'application/jsonl'})); return t; }",
        [name, text, size],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_create_a_project_then_upload_errors_prompts_search_and_prompt_page(
    page: Page, web_factory: Factory
) -> None:
    admin = web_factory.user("admin")
    slug = "browsed"
    problems: list[str] = []
    page.on(
        "console",  # where the browser reports what the CSP refused
        lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto("/admin/projects/new")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#email", admin.email)
    page.fill("#password", TEST_PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/admin/projects/new$"))
    page.fill("#f-name", "Browsed answers")
    page.fill("#f-slug", slug)
    page.locator("input[name=auto_generate]").uncheck()  # no model in this test to write answers
    page.get_by_role("button", name="Create project").click()
    expect(page).to_have_url(re.compile(f"/admin/projects/{slug}$"))
    expect(page.locator(".flash")).to_contain_text("Project Browsed answers created.")

    page.locator("nav.tabs a", has_text="Data").click()
    page.get_by_role("link", name="Upload data").click()
    expect(page).to_have_url(re.compile(f"/admin/projects/{slug}/upload$"))
    expect(page.locator("[data-for-kind=preferences]")).to_be_hidden()  # prompts are chosen

    bad = '{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": ""}\n'
    drop_file(page, "[data-dropzone]", "first-try.jsonl", bad)
    expect(page.locator("[data-file-name]")).to_contain_text("first-try.jsonl")
    page.get_by_role("button", name="Upload").click()
    problem = page.locator(".upload-problem")
    expect(problem).to_contain_text("first-try.jsonl")
    expect(problem.locator(".line-errors li")).to_have_text(["line 3, prompt: must not be empty"])
    assert web_factory.count(Prompt) == 0

    good = "\n".join(
        json.dumps({"prompt": text, "external_id": ext})
        for text, ext in [
            ("How tall is a giraffe?", "g1"),
            ("Why is the sky blue?", "s1"),
            ("Name a prime number.", "p1"),
        ]
    )
    payload = FilePayload(name="good.jsonl", mimeType="application/jsonl", buffer=good.encode())
    page.set_input_files("#upload-file", files=[payload])
    page.get_by_role("button", name="Upload").click()
    expect(page).to_have_url(re.compile(f"/admin/projects/{slug}/data$"))
    expect(page.locator(".flash")).to_contain_text("good.jsonl: 3 prompts created")
    table = page.locator("table.prompt-table tbody tr")
    expect(table).to_have_count(3)
    expect(table.first).to_contain_text("Name a prime number.")  # newest first

    page.fill("#f-q", "GIRAFFE")
    page.press("#f-q", "Enter")
    expect(table).to_have_count(1)
    expect(table.first).to_contain_text("How tall is a giraffe?")
    expect(page).to_have_url(re.compile(r"q=GIRAFFE"))  # the search is a link
    expect(page.locator(".result-count")).to_contain_text("1 prompt match")

    page.locator("table.prompt-table a.clip").first.click()
    expect(page.locator("h1.page-title")).to_have_text(re.compile(r"Prompt \d+"))
    expect(page.locator(".turns")).to_contain_text("How tall is a giraffe?")
    expect(page.locator(".kv")).to_contain_text("g1")
    assert problems == [], problems


def test_drop_marks_an_oversized_file_before_sending(page: Page, web_factory: Factory) -> None:
    admin = web_factory.user("admin")
    project = web_factory.project("big-files")
    page.goto("/login")
    page.fill("#email", admin.email)
    page.fill("#password", TEST_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    page.goto(f"/admin/projects/{project.slug}/upload")
    limit = int(page.locator("#upload-file").get_attribute("data-max-bytes") or 0)
    drop_file(page, "[data-dropzone]", "huge.jsonl", size=limit + 1)
    expect(page.locator("[data-file-name]")).to_contain_text("the limit is")
    page.get_by_role("button", name="Upload").click()
    expect(page).to_have_url(re.compile("/upload$"))  # the browser refused to send it
    assert page.locator(".upload-problem").count() == 0
