"""The Training tab in a real browser: an admin launches a reward run from its generated form,
lands on the run page and watches a real worker train it to the end without reloading (status,
step and log follow through htmx, the uPlot charts draw under the CSP); the browser refuses a
knob outside its bounds; a run driven through its hooks shows each change within 2 s and the
page stops asking once it has ended. Every test fails on a console error or CSP violation."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from playwright.sync_api import ConsoleMessage, Page, expect

from app.core.config import Settings
from app.core.db import make_sessionmaker, unit_of_work
from app.jobs import runner
from app.models import ComparisonPair, Judgment, Project, Prompt, Response, Run, RunMetric
from app.services import projects, runs
from tests.conftest import TEST_PASSWORD, Factory, engine_for
from tests.web.conftest import LiveServer
from tests.workers.conftest import CeleryProcess

pytestmark = pytest.mark.browser

MARKER = "helpful"
WORDS = ["yes", "no", "maybe", "good", "bad", "better", "worse", "honest", "sea", "poem"]


def seed_judgments(factory: Factory, slug: str, n: int, base_policy: str) -> Project:
    """A project whose rater always prefers the answer with the marker word (as in
    tests/workers/test_reward_worker.py): `n` judged pairs, enough for a reward run."""
    s = factory.session
    project = projects.create_project(
        s, slug, "Reward in the browser", settings={"overlap": 1, "base_policy": base_policy}
    )
    rater = factory.user(email=f"rater-{slug}@example.com")
    rng = random.Random(0)
    for i in range(n):
        prompt = Prompt(
            project_id=project.id, text=f"Question {i % 12}: say something", source="test"
        )
        s.add(prompt)
        s.flush()
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        a = Response(prompt_id=prompt.id, text=" ".join(words[:1] + [MARKER] + words[1:]))
        b = Response(prompt_id=prompt.id, text=" ".join(rng.choice(WORDS) for _ in range(3)))
        if i % 2:
            a, b = b, a
        s.add_all([a, b])
        s.flush()
        pair = ComparisonPair(
            project_id=project.id, prompt_id=prompt.id, response_a_id=a.id, response_b_id=b.id,
            required_judgments=1, judgment_count=1,
        )  # fmt: skip
        s.add(pair)
        s.flush()
        s.add(Judgment(project_id=project.id, pair_id=pair.id, rater_id=rater.id,
                       choice="a" if MARKER in a.text else "b", strength=2))  # fmt: skip
    s.commit()
    return project


def log_in(page: Page, email: str) -> None:
    page.goto("/login")
    page.fill("#email", email)
    page.fill("#password", TEST_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")


def watch_console(page: Page) -> list[str]:
    """Every console error, page error and CSP violation of the page, as text."""
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" or "Content Security Policy" in message.text:
            problems.append(f"console: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    # Violations are also events on the document; init scripts run outside the page's CSP.
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e =>"
        " console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI));"
    )
    return problems


CANVAS_INK = """canvas => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let inked = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) inked++;
  return inked;
}"""


@pytest.mark.worker
def test_launch_a_reward_run_and_watch_it_succeed_live(
    page: Page, web_factory: Factory, live_worker: CeleryProcess, tiny_model: Path
) -> None:
    project = seed_judgments(web_factory, "rm-web", 24, str(tiny_model))
    admin = web_factory.user("admin", email="admin-training@example.com")
    problems = watch_console(page)
    log_in(page, admin.email)

    page.goto(f"/admin/projects/{project.slug}/training")
    page.click(f'a[href="/admin/projects/{project.slug}/training/new/reward"]')
    expect(page.locator("h1.page-title")).to_contain_text("Reward model")
    page.fill("#f-epochs", "2")
    page.fill("#f-max_length", "64")
    page.select_option("#f-train_mode", "full")
    page.fill("#f-learning_rate", "0.003")
    page.fill("#f-val_fraction", "0.25")
    page.click("button.primary[type=submit]")

    expect(page).to_have_url(re.compile(r"/admin/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator(".flash")).to_contain_text(f"Run {run_id} (Reward model) queued.")
    # From here on nothing reloads the page: a marker on the window would be lost.
    page.evaluate("window.__stayed = true")

    status = page.locator("[data-run-status]")
    expect(status).to_have_text("succeeded", timeout=240_000)
    assert page.evaluate("window.__stayed === true"), "the page reloaded"
    expect(page.locator("[data-run-steps]")).to_contain_text(re.compile(r"step (\d+) / \1\b"))
    expect(page.locator("[data-run-log]")).to_contain_text("succeeded")
    expect(page.locator("#run-live")).not_to_have_attribute("hx-trigger", re.compile(".*"))
    # The result and the model version it made arrived out of band.
    expect(page.locator("#run-details")).to_contain_text("reward v")

    # Charts: one per metric group, each a uPlot canvas with something drawn on it.
    charts = page.locator("#run-charts .chart")
    expect(charts.first).to_be_visible(timeout=10_000)
    groups = charts.evaluate_all("els => els.map(e => e.getAttribute('data-group'))")
    assert "loss" in groups, groups
    canvas = page.locator("#run-charts .chart[data-group=loss] canvas")
    assert canvas.evaluate(CANVAS_INK) > 200
    expect(page.locator("[data-charts-empty]")).to_be_hidden()

    web_factory.session.commit()
    run = web_factory.session.get(Run, run_id)
    assert run is not None and run.status == "succeeded"
    assert (run.trigger, run.created_by_id) == ("console", admin.id)
    assert run.config["epochs"] == 2 and run.config["train_mode"] == "full"
    assert run.config["learning_rate"] == 0.003 and run.config["max_length"] == 64
    assert problems == [], problems


def test_the_browser_refuses_a_value_outside_its_bounds_before_sending(
    page: Page, web_factory: Factory
) -> None:
    project = web_factory.project("bounds", base_policy="/models/none")
    admin = web_factory.user("admin", email="admin-bounds@example.com")
    problems = watch_console(page)
    log_in(page, admin.email)
    url = f"/admin/projects/{project.slug}/training/new/reward"
    page.goto(url)
    page.fill("#f-epochs", "1000")  # max 100
    page.click("button.primary[type=submit]")
    expect(page.locator("#f-epochs:invalid")).to_have_count(1)
    assert page.url.endswith(url)  # nothing was sent
    web_factory.session.commit()
    count = web_factory.session.scalar(
        sa.select(sa.func.count()).select_from(Run).where(Run.project_id == project.id)
    )
    assert count == 0
    assert problems == [], problems


def test_run_page_charts_draw_under_the_csp(page: Page, web_factory: Factory) -> None:
    """A finished run's page draws every metric group once, and logs no CSP violation."""
    project = web_factory.project("charts", base_policy="/models/none")
    admin = web_factory.user("admin", email="admin-charts@example.com")
    s = web_factory.session
    run = Run(project_id=project.id, kind="ppo", status="succeeded", trigger="api", config={},
              progress_done=3, progress_total=3)  # fmt: skip
    s.add(run)
    s.flush()
    s.add_all(
        RunMetric(run_id=run.id, step=step, name=name, value=value)
        for step in range(3)
        for name, value in (("objective/kl", 0.1 * step), ("objective/scores", 1.0 - step / 4),
                            ("loss/value", 2.0 / (step + 1)))
    )  # fmt: skip
    s.commit()
    problems = watch_console(page)
    log_in(page, admin.email)
    page.goto(f"/admin/runs/{run.id}")
    charts = page.locator("#run-charts .chart")
    expect(charts).to_have_count(2)
    assert charts.evaluate_all("els => els.map(e => e.getAttribute('data-group'))") == [
        "loss", "objective",
    ]  # fmt: skip
    expect(page.locator(".chart[data-group=objective] .u-legend")).to_contain_text("scores")
    assert page.locator(".chart[data-group=objective] canvas").evaluate(CANVAS_INK) > 200
    assert problems == [], problems


def test_run_page_follows_progress_within_two_seconds_and_stops_polling_at_the_end(
    page: Page, web_factory: Factory, live_server: LiveServer
) -> None:
    """Driven the way a worker drives a run (`claim_run`, `RunHooks`), without one: step, ETA,
    log and charts follow within 2 s; once the run has ended the page asks for nothing more."""
    url = live_server.database_url
    project = web_factory.project("live", base_policy="/models/none")
    admin = web_factory.user("admin", email="admin-live@example.com")
    settings = Settings(database_url=url, var_dir=live_server.var_dir, broker_url="memory://")
    sessions = make_sessionmaker(engine_for(url))
    with unit_of_work(sessions) as s:
        run = runs.create_run(s, s.merge(project), "generate", settings=settings)
    with unit_of_work(sessions) as s:
        assert runner.claim_run(s, run.id, worker="test-worker") == 1
    hooks = runner.RunHooks(url, run.id, 1, heartbeat_interval_s=60)
    hooks.progress(1, 10, "first step done")
    hooks.metrics(1, {"loss/train": 0.9})

    problems = watch_console(page)
    log_in(page, admin.email)
    page.goto(f"/admin/runs/{run.id}")
    expect(page.locator("[data-run-steps]")).to_contain_text("step 1 / 10")
    legend = page.locator(".chart[data-group=loss] .u-legend")
    expect(legend).to_contain_text("0.9")

    hooks.progress(4, 10, "four of ten <b>bold?</b>")
    hooks.metrics(4, {"loss/train": 0.25})
    expect(page.locator("[data-run-steps]")).to_contain_text("step 4 / 10", timeout=2_000)
    expect(page.locator("[data-run-log]")).to_contain_text("four of ten <b>bold?</b>")
    expect(page.locator("[data-run-eta]")).to_have_text(re.compile(r"^\d+:\d\d:\d\d$"))
    expect(legend).to_contain_text("0.25", timeout=2_500)  # the charts poll every 2 s

    hooks.finish("succeeded", result={"responses": 8})
    expect(page.locator("[data-run-status]")).to_have_text("succeeded", timeout=2_000)
    expect(page.locator("#run-details")).to_contain_text("responses")
    expect(page.locator("#run-charts")).to_have_attribute("data-polling", "done", timeout=3_000)
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url))
    page.wait_for_timeout(4_000)
    assert polls == [], polls
    assert problems == [], problems
