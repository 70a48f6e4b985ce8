"""Every page the app serves, generated from its own route table, in a real browser with the
untrusted-content corpus in every place a page shows untrusted text (prompts, answers,
rationales, run logs and samples, evaluation samples): the page loads, the CSP enforces with no
violation and no script error in the console, nothing in the corpus runs (no dialog, no
`window.__pwned`), and no request leaves the app's origin.

A GET route that is not a page must say why in `NOT_PAGES`; any other new route is visited
here without further ado, so a page added later is covered the day it lands.
"""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from playwright.sync_api import ConsoleMessage, Dialog, Page, Request

from app.main import create_app
from tests.conftest import TEST_PASSWORD, Factory
from tests.console.conftest import Seeded, seed
from tests.console.test_access import concrete
from tests.web.conftest import LiveServer
from tests.web.test_rating import XSS_CORPUS

pytestmark = pytest.mark.browser

NOT_PAGES = {
    "/openapi.json": "the API document (JSON)",
    "/healthz": "a health check (JSON)",
    "/readyz": "a readiness check (JSON)",
    "/metrics": "Prometheus text",
    "/favicon.ico": "an icon",
    "/admin/runs/{run_id}/metrics.json": "a chart's data (JSON)",
}
# Seen signed out: the login page, and an invite link (signed in, it asks to sign out first).
ANONYMOUS = {"/login", "/invite/{token}"}

PAGES = sorted(
    context.path
    for context in iter_route_contexts(create_app().router.routes)
    if isinstance(context.original_route, APIRoute)
    and "GET" in (context.methods or ())
    and not context.path.startswith("/api/")
    and context.path not in NOT_PAGES
)


def test_the_page_list_is_the_route_table() -> None:
    assert len(PAGES) > 25, PAGES
    assert {"/", "/p/{slug}/rate", "/admin/projects/{slug}/data", "/account/tokens"} <= set(PAGES)


class Watch:
    """What a page did that it must not: console errors and CSP reports, script errors,
    dialogs, requests that leave the origin."""

    def __init__(self, page: Page, origin: str) -> None:
        self.problems: list[str] = []
        self.origin = origin
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"pageerror: {error}"))
        page.on("dialog", self._dialog)
        page.on("request", self._request)
        page.add_init_script("window.alert = (m) => { window.__pwned = 'alert:' + m; };")

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning") or "Content Security Policy" in message.text:
            self.problems.append(f"console {message.type}: {message.text}")

    def _dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def _request(self, request: Request) -> None:
        if not request.url.startswith((self.origin, "data:")):
            self.problems.append(f"request off the origin: {request.url}")


def log_in(page: Page, url: str, email: str) -> None:
    page.goto(f"{url}/login")
    page.locator("#email").fill(email)
    page.locator("#password").fill(TEST_PASSWORD)
    page.locator("#password").press("Enter")
    page.wait_for_url(re.compile(r".*/(admin|p/.*)?$"))


def visit(page: Page, watch: Watch, url: str) -> list[str]:
    before = len(watch.problems)
    response = page.goto(url)
    page.wait_for_load_state("networkidle")
    problems = list(watch.problems[before:])
    if response is None or response.status >= 400:
        problems.append(f"answered {response.status if response else 'nothing'}")
    if page.evaluate("window.__pwned") is not None:
        problems.append(f"the corpus ran: {page.evaluate('window.__pwned')}")
    return problems


def test_every_page_enforces_its_csp_and_keeps_the_corpus_inert(
    page: Page, web_factory: Factory, live_server: LiveServer
) -> None:
    seeded: Seeded = seed(web_factory, hostile="\n\n".join(XSS_CORPUS))
    # A pair still to judge, so the rater page shows the corpus rather than "all done".
    web_factory.pair(seeded.project, ("\n".join(XSS_CORPUS), "plain"), prompt=XSS_CORPUS[0])
    token = _invite_secret(web_factory, seeded)
    watch = Watch(page, live_server.url)
    failures: dict[str, list[str]] = {}

    def path_of(route: str) -> str:
        return concrete(route.replace("{token}", token), seeded)

    for route in sorted(ANONYMOUS & set(PAGES)):
        if problems := visit(page, watch, live_server.url + path_of(route)):
            failures[route] = problems
    log_in(page, live_server.url, seeded.admin.email)
    for route in PAGES:
        if route in ANONYMOUS:
            continue
        if problems := visit(page, watch, live_server.url + path_of(route)):
            failures[route] = problems
    assert failures == {}


def _invite_secret(factory: Factory, seeded: Seeded) -> str:
    """A fresh invite's secret (the seeded one's is not kept: only its hash is stored)."""
    from app.services import users

    created = users.create_invite(factory.session, role="rater", note="page", actor=seeded.admin)
    factory.session.commit()
    return created.secret
