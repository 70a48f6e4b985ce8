"""The Models tab: versions and the leaderboard, a version page, promote and roll back, and the
playground's forms and the fragment that follows their runs. Each test asserts the answer and
the rows it left; the page tests also assert that the statement count does not grow with the
rows shown."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import (
    AuditEvent,
    ComparisonPair,
    Judgment,
    ModelVersion,
    Project,
    Prompt,
    Response,
    Run,
    User,
    utcnow,
)
from app.services import leaderboard
from tests.conftest import Factory
from tests.console.conftest import Browser, Seeded, counted_statements

# The fixture's browsers, typed loosely: their answers are httpx responses.
Make = Callable[[User | None], Any]


def _status(session: Session, version_id: int) -> str:
    session.rollback()  # a new read: SQLite would keep showing the snapshot it began with
    session.expire_all()
    row = session.get(ModelVersion, version_id)
    assert row is not None
    return row.status


def _policy(
    session: Session, project: Project, version: int, parent: ModelVersion | None, **kw: Any
) -> ModelVersion:
    kw.setdefault("status", "archived")
    kw.setdefault("artifact_path", f"/artifacts/p{version}")
    row = ModelVersion(
        project_id=project.id, kind="policy", version=version, name=f"ppo v{version}",
        base_model="/models/base", parent_id=parent.id if parent else None, **kw,
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row


def _samples(n: int) -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"Question {i}?",
            "response": f"**Answer {i}** <script>alert({i})</script>",
            "score": 0.5 + i / 100,
            "parent_response": f"parent answer {i}",
            "parent_score": 0.25,
        }
        for i in range(n)
    ]


def _evaluated(factory: Factory, seeded: Seeded, samples: int = 2) -> ModelVersion:
    """Seeded policy v1 trained by a PPO run, evaluated by an evaluate run, with samples."""
    s = factory.session
    ppo = Run(project_id=seeded.project.id, kind="ppo", status="succeeded", config={})
    evaluate = Run(project_id=seeded.project.id, kind="evaluate", status="succeeded", config={})
    s.add_all([ppo, evaluate])
    s.flush()
    version = s.get(ModelVersion, seeded.policy.id)
    assert version is not None
    version.run_id = ppo.id
    version.snapshot_id = seeded.run.snapshot_id
    version.metrics = {
        "heldout": {"fraction": 0.2, "seed": 0},
        "train": {"objective/kl": 1.1, "loss/value": 0.08},
        "steps": 4,
        "score_gain": 0.3,
        "kl_to_parent": 1.2,
        "mean_score": 0.7,
        "evaluation": {
            "mean_score": 0.7, "parent_mean_score": 0.4, "score_gain": 0.3, "kl_to_parent": 1.2,
            "run_id": evaluate.id, "heldout_prompt_ids": [1, 2, 3], "samples": _samples(samples),
        },
        "promotion_rule": {"passed": True, "reason": "score gain +0.3000 >= 0 and KL 1.2 <= 10"},
    }  # fmt: skip
    s.commit()
    return version


def _version_eval_games(
    factory: Factory, seeded: Seeded, first: ModelVersion, second: ModelVersion, n: int
) -> None:
    """`n` judged version_eval pairs of `first` (a) against `second` (b); a wins 2 in 3."""
    s = factory.session
    prompt = Prompt(project_id=seeded.project.id, text="eval prompt", source="test")
    s.add(prompt)
    s.flush()
    for k in range(n):
        a = Response(prompt_id=prompt.id, text=f"a{k}", model_version_id=first.id)
        b = Response(prompt_id=prompt.id, text=f"b{k}", model_version_id=second.id)
        s.add_all([a, b])
        s.flush()
        pair = ComparisonPair(
            project_id=seeded.project.id, prompt_id=prompt.id, response_a_id=a.id,
            response_b_id=b.id, required_judgments=1, judgment_count=1, kind="version_eval",
        )  # fmt: skip
        s.add(pair)
        s.flush()
        choice = "b" if k % 3 == 2 else "a"
        s.add(
            Judgment(project_id=seeded.project.id, pair_id=pair.id, rater_id=seeded.rater.id,
                     choice=choice, strength=1)
        )  # fmt: skip
    s.commit()


def _htmx(who: Browser, path: str, data: dict[str, Any]) -> Any:
    """A form sent by htmx: it wants the form's card back, not a page."""
    return who.client.post(
        path, data={"csrf_token": who.csrf, **data}, follow_redirects=False,
        headers={"accept": "text/html", "hx-request": "true"},
    )  # fmt: skip


def _base(factory: Factory, seeded: Seeded) -> ModelVersion:
    row = factory.session.scalar(
        select(ModelVersion).where(
            ModelVersion.project_id == seeded.project.id,
            ModelVersion.kind == "policy",
            ModelVersion.version == 0,
        )
    )
    assert row is not None
    return row


# --- the versions page ------------------------------------------------------------------------


def test_versions_page_shows_both_kinds_and_the_leaderboard_chart(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    base = _base(factory, seeded)
    policy = _evaluated(factory, seeded)
    _version_eval_games(factory, seeded, policy, base, 12)
    page = browser_for(seeded.reviewer).get(f"/admin/projects/{seeded.project.slug}/models")
    assert page.status_code == 200
    html = page.text
    assert 'aria-current="page">Models</a>' in html
    assert f'href="/admin/models/{policy.id}"' in html and "+0.300" in html and "1.20" in html
    assert "✓ passed" in html
    assert f'href="/admin/runs/{policy.run_id}">ppo #{policy.run_id}</a>' in html
    assert f'href="/admin/runs/{seeded.run.id}">reward #{seeded.run.id}</a>' in html
    assert "75.0 %" in html  # the reward model's best validation accuracy
    # The chart: an inline SVG scaled by its viewBox, drawn with attributes, never style=.
    svg = html[html.index("<svg") : html.index("</svg>")]
    assert 'viewBox="0 0 400' in svg and "style=" not in html
    assert svg.count('class="lb-dot"') == 2 and svg.count('class="lb-whisker"') == 2
    assert "12 judgments" in html
    dots = [float(x) for x in re.findall(r'class="lb-dot" cx="([\d.]+)"', svg)]
    assert dots[0] > dots[1]  # best first, drawn further right
    assert 'href="/admin/projects/console/playground"' in html


def test_versions_page_without_judgments_says_how_the_leaderboard_fills(
    seeded: Seeded, browser_for: Make
) -> None:
    html = browser_for(seeded.admin).get(f"/admin/projects/{seeded.project.slug}/models").text
    assert "<svg" not in html and "No human comparisons of versions yet" in html


def test_versions_page_statements_do_not_grow_with_versions_or_judgments(
    seeded: Seeded, factory: Factory, browser_for: Make, app: FastAPI
) -> None:
    admin = browser_for(seeded.admin)
    url = f"/admin/projects/{seeded.project.slug}/models"
    base = _base(factory, seeded)
    policy = _evaluated(factory, seeded)
    _version_eval_games(factory, seeded, policy, base, 3)
    admin.get(url)  # warm: the first request of a client loads its user and session
    with counted_statements(app.state.engine) as few:
        assert admin.get(url).status_code == 200
    parent = policy
    for number in range(2, 14):
        parent = _policy(factory.session, seeded.project, number, parent, run_id=seeded.run.id)
    factory.session.commit()
    _version_eval_games(factory, seeded, parent, policy, 30)
    with counted_statements(app.state.engine) as many:
        html = admin.get(url).text
    assert "v13" in html and html.count('class="lb-dot"') == 3
    assert len(many) == len(few), many


# --- a version page ---------------------------------------------------------------------------


def test_version_page_shows_metrics_lineage_and_samples_side_by_side(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    policy = _evaluated(factory, seeded)
    html = browser_for(seeded.reviewer).get(f"/admin/models/{policy.id}").text
    assert 'aria-current="page">Models</a>' in html  # the project's tabs
    assert "Promotion rule passed" in html
    # Lineage: snapshot -> reward model -> this policy -> evaluation run; then the parents.
    chain = html[html.index('class="chain"') : html.index('class="chain parents"')]
    order = [
        f"#{seeded.run.snapshot_id}",
        f'href="/admin/models/{seeded.reward.id}"',
        f'href="/admin/models/{policy.id}" aria-current="page"',
        f"/admin/runs/{policy.metrics['evaluation']['run_id']}",
    ]
    positions = [chain.index(o) for o in order]
    assert positions == sorted(positions)
    parents = html[html.index('class="chain parents"') :]
    assert f'href="/admin/models/{_base(factory, seeded).id}"' in parents.split("</ol>")[0]
    # Metrics as key/value lists, nested groups under their titles.
    for text in ("Training metrics (last step)", "objective/kl", "Held-out split",
                 "Evaluation on held-out prompts", "parent_mean_score", "1, 2, 3"):  # fmt: skip
        assert text in html
    # Samples: markdown rendered, the model's markup escaped, both scores.
    assert "<strong>Answer 0</strong>" in html and "<script>alert" not in html
    assert "&lt;script&gt;" in html
    assert "score 0.500" in html and "score 0.250" in html and "parent answer 1" in html
    assert "style=" not in html
    assert 'action="/admin/models/' not in html  # a reviewer gets no form
    assert "Only admins can promote" in html


def test_version_page_statements_do_not_grow_with_samples_or_ancestors(
    seeded: Seeded, factory: Factory, browser_for: Make, app: FastAPI
) -> None:
    policy = _evaluated(factory, seeded, samples=1)
    admin = browser_for(seeded.admin)
    admin.get(f"/admin/models/{policy.id}")
    with counted_statements(app.state.engine) as few:
        assert admin.get(f"/admin/models/{policy.id}").status_code == 200
    deep = _evaluated(factory, seeded, samples=12)
    parent = deep
    for number in range(2, 12):
        parent = _policy(factory.session, seeded.project, number, parent)
    factory.session.commit()
    deep_row = factory.session.get(ModelVersion, parent.id)
    assert deep_row is not None
    deep_row.metrics = {**deep.metrics}
    deep_row.run_id = deep.run_id
    deep_row.snapshot_id = deep.snapshot_id
    deep_row.reward_model_id = seeded.reward.id
    factory.session.commit()
    with counted_statements(app.state.engine) as many:
        html = admin.get(f"/admin/models/{parent.id}").text
    assert html.count('class="sample"') == 12
    assert html.count("chain-item") >= 4 + 11
    assert len(many) == len(few), many


def test_missing_version_is_a_404_page(seeded: Seeded, browser_for: Make) -> None:
    page = browser_for(seeded.admin).get("/admin/models/999999")
    assert page.status_code == 404 and "not found" in page.text


# --- promote and roll back ----------------------------------------------------------------------


def _events(session: Session, action: str) -> list[AuditEvent]:
    session.rollback()
    session.expire_all()
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_admin_promotes_with_a_reason_and_queues_a_generation_run(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    admin = browser_for(seeded.admin)
    base = _base(factory, seeded)
    page = admin.get(f"/admin/models/{seeded.policy.id}").text
    assert f'action="/admin/models/{seeded.policy.id}/promote"' in page
    assert 'data-confirm="Promote policy v1 (archiving v0)?"' in page
    assert 'name="generate" value="on" checked' in page
    done = admin.post(
        f"/admin/models/{seeded.policy.id}/promote",
        {"reason": "better on held-out", "generate": "on"},
    )
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"/admin/models/{seeded.policy.id}"
    assert (_status(factory.session, seeded.policy.id), _status(factory.session, base.id)) == (
        "active", "archived",
    )  # fmt: skip
    [event] = _events(factory.session, "model.promote")
    assert (event.actor_id, event.target_id) == (seeded.admin.id, seeded.policy.id)
    assert event.data["reason"] == "better on held-out" and event.data["previous_id"] == base.id
    run = factory.session.scalar(select(Run).where(Run.kind == "generate"))
    assert run is not None and run.status == "queued"
    shown = admin.get(f"/admin/models/{seeded.policy.id}").text
    assert f"Policy v1 is active now; v0 is archived; generation run {run.id} queued." in shown
    assert "This is the active policy" in shown


def test_promote_without_generation_queues_nothing(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    done = browser_for(seeded.admin).post(
        f"/admin/models/{seeded.policy.id}/promote", {"reason": "ok"}
    )
    assert done.status_code == 303
    assert factory.session.scalar(select(Run).where(Run.kind == "generate")) is None


def test_promote_needs_a_reason_and_changes_nothing_without_one(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    page = browser_for(seeded.admin).post(
        f"/admin/models/{seeded.policy.id}/promote", {"reason": "  ", "generate": "on"}
    )
    assert page.status_code == 422
    assert 'id="reason-error">give a reason' in page.text
    assert _status(factory.session, seeded.policy.id) == "candidate"
    assert _events(factory.session, "model.promote") == []


def test_a_refused_promotion_is_a_flash_on_the_page(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    base = _base(factory, seeded)
    page = browser_for(seeded.admin).post(f"/admin/models/{base.id}/promote", {"reason": "again"})
    assert page.status_code == 409
    html = page.text
    assert 'class="flash bad"' in html and "is already active" in html
    assert "Policy v0" in html and "Lineage" in html  # the version page, not an error page
    assert _events(factory.session, "model.promote") == []


def test_admin_rolls_back_to_an_earlier_version_and_not_to_a_newer_one(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    admin = browser_for(seeded.admin)
    base = _base(factory, seeded)
    assert (
        admin.post(f"/admin/models/{seeded.policy.id}/promote", {"reason": "r"}).status_code == 303
    )
    page = admin.get(f"/admin/models/{base.id}").text
    assert f'action="/admin/models/{base.id}/rollback"' in page and "Roll back to v0" in page
    newer = admin.post(f"/admin/models/{seeded.policy.id}/rollback", {"reason": "r"})
    assert newer.status_code == 409 and "not earlier than" in newer.text
    done = admin.post(
        f"/admin/models/{base.id}/rollback", {"reason": "v1 rambles", "generate": "on"}
    )
    assert done.status_code == 303
    assert (_status(factory.session, base.id), _status(factory.session, seeded.policy.id)) == (
        "active", "archived",
    )  # fmt: skip
    [event] = _events(factory.session, "model.rollback")
    assert event.data["reason"] == "v1 rambles" and event.data["previous_id"] == seeded.policy.id
    assert factory.session.scalar(select(Run).where(Run.kind == "generate")) is not None


def test_a_reward_model_page_has_no_generation_checkbox(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    s = factory.session
    newer = ModelVersion(
        project_id=seeded.project.id, kind="reward", version=1, name="reward v1",
        base_model="/models/base", artifact_path="/artifacts/r1", status="candidate",
        parent_id=seeded.reward.id, metrics={"accuracy/val": 0.7},
    )  # fmt: skip
    s.add(newer)
    s.commit()
    admin = browser_for(seeded.admin)
    html = admin.get(f"/admin/models/{newer.id}").text
    assert 'name="generate"' not in html and "Promote v1" in html
    done = admin.post(f"/admin/models/{newer.id}/promote", {"reason": "more accurate"})
    assert done.status_code == 303
    assert _status(s, newer.id) == "active" and _status(s, seeded.reward.id) == "archived"
    assert s.scalar(select(Run).where(Run.kind == "generate")) is None


# --- the playground -----------------------------------------------------------------------------


def test_playground_offers_every_usable_version(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    _policy(factory.session, seeded.project, 2, seeded.policy, status="failed")
    factory.session.commit()
    html = browser_for(seeded.admin).get(f"/admin/projects/{seeded.project.slug}/playground").text
    generate = html[html.index('id="generate-card"') : html.index('id="score-card"')]
    assert f'value="{seeded.policy.id}"' in generate and ">v0 · base (active)<" in html
    assert "v2 · ppo v2" not in generate  # failed: no weights to answer with
    assert 'name="max_new_tokens"' in generate and 'name="temperature"' in generate
    assert f'value="{seeded.reward.id}"' in html[html.index('id="score-card"') :]
    reviewer = browser_for(seeded.reviewer).get(f"/admin/projects/{seeded.project.slug}/playground")
    assert "Only admins can run models" in reviewer.text and " disabled>" in reviewer.text


def test_generate_queues_a_sample_run_and_answers_a_fragment_that_follows_it(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    admin = browser_for(seeded.admin)
    url = f"/admin/projects/{seeded.project.slug}/playground/generate"
    form = {"version_id": seeded.policy.id, "prompt": "Say hi", "max_new_tokens": "16",
            "temperature": "0", "num_responses": "2", "top_p": "0.9", "seed": "3"}  # fmt: skip
    card = _htmx(admin, url, form)
    assert card.status_code == 200, card.text
    run = factory.session.scalar(select(Run).where(Run.kind == "sample"))
    assert run is not None and run.status == "queued" and run.trigger == "console"
    assert run.config["model_version_id"] == seeded.policy.id
    assert (run.config["prompt"], run.config["max_new_tokens"], run.config["num_responses"]) == (
        "Say hi", 16, 2,
    )  # fmt: skip
    html = card.text
    assert html.lstrip().startswith('<section class="card play-card" id="generate-card"')
    assert f'hx-get="/admin/runs/{run.id}/answer" hx-trigger="every 1s"' in html
    assert ">Say hi</textarea>" in html  # the form keeps what was sent
    # Without htmx: back to the playground, which follows the run, filled from its config.
    plain = admin.post(url, form)
    assert plain.status_code == 303
    location = plain.headers["location"]
    factory.session.rollback()
    second = factory.session.scalars(select(Run).where(Run.kind == "sample")).all()[-1]
    assert location == f"/admin/projects/{seeded.project.slug}/playground?generate={second.id}"
    page = admin.get(location).text
    assert f"Sample run {second.id} queued." in page and ">Say hi</textarea>" in page
    assert f'hx-get="/admin/runs/{second.id}/answer"' in page


def test_generate_refuses_bad_input_at_its_fields_and_queues_nothing(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    admin = browser_for(seeded.admin)
    url = f"/admin/projects/{seeded.project.slug}/playground/generate"
    page = admin.post(url, {"version_id": seeded.reward.id, "prompt": " ", "max_new_tokens": "0"})
    assert page.status_code == 422
    html = page.text
    assert 'id="gen-version-error">not a policy model' in html
    assert 'id="gen-prompt-error">&#39;prompt&#39; must not be empty' in html
    assert re.search(r'id="f-max_new_tokens-error">[^<]*greater than or equal to 1', html)
    other = factory.project("other")
    s = factory.session
    foreign = _policy(s, other, 0, None, status="active", artifact_path=None)
    s.commit()
    page = _htmx(admin, url, {"version_id": foreign.id, "prompt": "hi"})
    assert page.status_code == 422 and "not a model of this project" in page.text
    assert page.text.lstrip().startswith("<section")
    assert s.scalar(select(Run).where(Run.kind == "sample")) is None


def test_score_queues_a_score_run_of_both_answers(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    admin = browser_for(seeded.admin)
    url = f"/admin/projects/{seeded.project.slug}/playground/score"
    missing = admin.post(url, {"version_id": seeded.reward.id, "prompt": "Q", "response_a": "x"})
    assert missing.status_code == 422
    assert 'id="score-response_b-error">write an answer to score' in missing.text
    form = {"version_id": seeded.reward.id, "prompt": "Q?", "response_a": "yes", "response_b": "no"}
    card = _htmx(admin, url, form)
    assert card.status_code == 200
    run = factory.session.scalar(select(Run).where(Run.kind == "score"))
    assert run is not None and run.config["responses"] == ["yes", "no"]
    assert run.config["model_version_id"] == seeded.reward.id
    assert f'hx-get="/admin/runs/{run.id}/answer"' in card.text


def _run(factory: Factory, seeded: Seeded, kind: str, status: str, **kw: Any) -> Run:
    config = {"prompt": "Why?", "messages": None, "model_version_id": seeded.policy.id}
    if kind == "sample":
        config.update(num_responses=2, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=0)
    else:
        config.update(model_version_id=seeded.reward.id, responses=["good", "bad"])
    run = Run(project_id=seeded.project.id, kind=kind, status=status, config=config, **kw)
    factory.session.add(run)
    factory.session.commit()
    return run


def test_the_answer_fragment_polls_until_the_run_ends_then_shows_it(
    seeded: Seeded, factory: Factory, browser_for: Make, app: FastAPI
) -> None:
    reviewer = browser_for(seeded.reviewer)
    queued = _run(factory, seeded, "sample", "queued")
    html = reviewer.get(f"/admin/runs/{queued.id}/answer").text
    assert 'hx-trigger="every 1s"' in html and "waiting for a model worker" in html
    answers = [
        {"text": "**hi**", "truncated": False, "tokens": 3},
        {"text": "a long <b>one</b>", "truncated": True, "tokens": 8},
    ]
    done = _run(factory, seeded, "sample", "succeeded", result={"responses": answers})
    reviewer.get(f"/admin/runs/{done.id}/answer")
    with counted_statements(app.state.engine) as statements:
        html = reviewer.get(f"/admin/runs/{done.id}/answer").text
    assert "hx-get" not in html and "hx-trigger" not in html  # it stops polling
    assert "<strong>hi</strong>" in html and "&lt;b&gt;one&lt;/b&gt;" in html
    assert html.count("cut off at the token limit") == 1 and "8 tokens" in html
    assert len(statements) <= 3, statements  # the user, the run (and the session's user row)
    scored = _run(factory, seeded, "score", "succeeded", result={"scores": [1.25, -0.5]})
    html = reviewer.get(f"/admin/runs/{scored.id}/answer").text
    assert "score 1.250" in html and "score -0.500" in html and "good" in html
    failed = _run(factory, seeded, "sample", "failed", error="ModelLoadError: no such directory")
    html = reviewer.get(f"/admin/runs/{failed.id}/answer").text
    assert "ModelLoadError: no such directory" in html and "hx-get" not in html
    other = reviewer.get(f"/admin/runs/{seeded.run.id}/answer").text
    assert "has no answer to show" in other


def test_leaderboard_counts_settled_judgments_once_and_stay_exact(
    seeded: Seeded, factory: Factory
) -> None:
    # The versions page reads the leaderboard's counts incrementally: settled judgments are
    # kept per project in the process, recent ones are read again on every look.
    base = _base(factory, seeded)
    policy = _evaluated(factory, seeded)
    s = factory.session

    def games_now(now: datetime) -> int:
        s.rollback()
        counts = leaderboard.version_game_counts(s, seeded.project, now=now)
        exact = leaderboard.version_games(s, seeded.project)
        assert sorted((a, b, score) for a, b, score, n in counts for _ in range(n)) == sorted(
            (g.first, g.second, g.score) for g in exact
        )
        return sum(n for *_, n in counts)

    start = utcnow()
    _version_eval_games(factory, seeded, policy, base, 6)
    assert games_now(start) == 6  # all recent: read as such
    _version_eval_games(factory, seeded, policy, base, 4)
    assert games_now(start + timedelta(hours=1)) == 10  # settled since the last look: added
    assert games_now(start + timedelta(hours=2)) == 10  # nothing new: nothing counted twice
    _version_eval_games(factory, seeded, base, policy, 3)
    assert games_now(utcnow()) == 13  # a clock behind the last look counts afresh
