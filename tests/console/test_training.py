"""The Training tab and run pages through the browser session (TestClient): the runs list and
its filters and pages, launch forms generated from a kind's config, a run's page and its live
fragment, metrics for the charts, cancel and retry, and statement counts that do not grow with
the rows shown."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from pydantic import BaseModel

from app.kinds.knobs import knob_table
from app.kinds.registry import LAUNCHABLE_KINDS, RUN_KINDS
from app.models import AuditEvent, DatasetSnapshot, ModelVersion, Project, Run, RunMetric, utcnow
from app.services.runs import format_duration as clock
from tests.conftest import Factory
from tests.console.conftest import Browser, Seeded, counted_statements

BrowserFor = Callable[..., Browser]


def add_runs(factory: Factory, project: Project, n: int, **fields: Any) -> list[Run]:
    factory.session.commit()
    rows = [
        Run(project_id=project.id, kind=fields.get("kind", "generate"),
            status=fields.get("status", "succeeded"), trigger=fields.get("trigger", "api"),
            config=fields.get("config", {}), created_by_id=fields.get("created_by_id"),
            parent_run_id=fields.get("parent_run_id"), error=fields.get("error"),
            progress_done=fields.get("progress_done", 0),
            progress_total=fields.get("progress_total"))
        for _ in range(n)
    ]  # fmt: skip
    factory.session.add_all(rows)
    factory.session.commit()
    return rows


def runs_of(factory: Factory, project: Project) -> list[Run]:
    factory.session.commit()
    found = list(
        factory.session.scalars(
            sa.select(Run)
            .where(Run.project_id == project.id)
            .order_by(Run.id)
            .execution_options(populate_existing=True)
        )
    )
    factory.session.commit()
    return found


def row_ids(html: str) -> list[int]:
    return [int(m) for m in re.findall(r'<td class="num"><a href="/admin/runs/(\d+)">', html)]


def test_clock_formats_durations_as_hours_minutes_seconds() -> None:
    assert clock(None) == "—"
    assert clock(0) == "0:00:00"
    assert clock(187.4) == "0:03:07"
    assert clock(3 * 3600 + 61) == "3:01:01"


# --- the runs list ----------------------------------------------------------------------------


def test_runs_list_newest_first_with_who_started_them_and_the_launch_menu(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    project = seeded.project
    by_admin = add_runs(
        factory, project, 1, kind="ppo", status="running", trigger="console",
        created_by_id=seeded.admin.id, progress_done=3, progress_total=12,
    )[0]  # fmt: skip
    failed = add_runs(
        factory, project, 1, status="failed", trigger="upload",
        error="ModelLoadError: no model here\nTraceback (most recent call last):",
    )[0]  # fmt: skip
    child = add_runs(factory, project, 1, kind="evaluate", status="queued", trigger="auto",
                     parent_run_id=by_admin.id)[0]  # fmt: skip

    answer = browser_for(seeded.admin).get(f"/admin/projects/{project.slug}/training")
    assert answer.status_code == 200
    html = answer.text
    assert row_ids(html) == [child.id, failed.id, by_admin.id, seeded.run.id]
    assert 'aria-current="page">Training' in html
    assert '<span class="badge running">running</span>' in html
    assert seeded.admin.email in html and f"run #{by_admin.id}" in html and "an upload" in html
    assert "ModelLoadError: no model here" in html and "Traceback" not in html
    assert '<progress class="mini" value="3" max="12">' in html and "3/12" in html
    # The launch menu: every launchable kind, with its title and summary from the registry.
    for kind in ("generate", "reward", "ppo", "dpo", "evaluate"):
        assert f'/training/new/{kind}"' in html
    assert "/training/new/score" not in html
    assert "snapshot the judgments and train a Bradley-Terry reward model" in html

    reviewer = browser_for(seeded.reviewer).get(f"/admin/projects/{project.slug}/training")
    assert reviewer.status_code == 200 and "/training/new/" not in reviewer.text


def test_runs_list_filters_by_kind_and_status(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    project = seeded.project
    queued_ppo = add_runs(factory, project, 2, kind="ppo", status="queued")
    add_runs(factory, project, 1, kind="ppo", status="failed")
    add_runs(factory, project, 2, kind="generate", status="queued")
    admin = browser_for(seeded.admin)
    base = f"/admin/projects/{project.slug}/training"

    both = admin.get(f"{base}?kind=ppo&status=queued")
    assert row_ids(both.text) == [r.id for r in reversed(queued_ppo)]
    assert '<option value="ppo" selected>' in both.text
    assert '<option value="queued" selected>' in both.text
    assert len(row_ids(admin.get(f"{base}?kind=ppo").text)) == 3
    assert len(row_ids(admin.get(f"{base}?status=queued").text)) == 4
    assert len(row_ids(admin.get(f"{base}?kind=&status=").text)) == 6  # the form's "every"
    assert "No runs match" in admin.get(f"{base}?kind=dpo").text
    assert admin.get(f"{base}?status=sleeping").status_code == 422


def test_runs_list_pages_by_id_fifty_at_a_time(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    project = seeded.project
    add_runs(factory, project, 119, kind="generate")
    every = [r.id for r in reversed(runs_of(factory, project))]
    assert len(every) == 120
    admin = browser_for(seeded.admin)
    base = f"/admin/projects/{project.slug}/training"

    first = admin.get(base).text
    assert row_ids(first) == every[:50]
    assert "Newer" not in first
    older = re.search(r'href="\?before=(\d+)">Older', first)
    assert older is not None and int(older[1]) == every[49]
    second = admin.get(f"{base}?before={older[1]}").text
    assert row_ids(second) == every[50:100]
    third = admin.get(f"{base}?before={every[99]}").text
    assert row_ids(third) == every[100:]
    assert "Older" not in third
    newer = re.search(r'href="\?after=(\d+)">', third)
    assert newer is not None
    assert row_ids(admin.get(f"{base}?after={newer[1]}").text) == every[50:100]
    back = admin.get(f"{base}?after={every[50]}").text
    assert row_ids(back) == every[:50] and "Newer" not in back
    # The filters travel with the pages.
    assert 'href="?kind=generate&amp;before=' in admin.get(f"{base}?kind=generate").text


# --- launching --------------------------------------------------------------------------------


def test_launch_form_is_generated_from_the_kinds_config(
    seeded: Seeded, browser_for: BrowserFor
) -> None:
    url = f"/admin/projects/{seeded.project.slug}/training/new/reward"
    html = browser_for(seeded.admin).get(url).text
    # Defaults, bounds (the browser refuses a value outside them) and help, per knob.
    assert re.search(r'name="epochs" value="1" step="1" min="0" max="100" required', html)
    assert re.search(r'name="val_fraction" value="0.15" step="any" min="0.0"', html)
    assert "Passes over the training pairs." in html and "(≥ 0, ≤ 100)" in html
    assert '<option value="last_n" selected>last_n</option>' in html
    # The nested data config is a fieldset of its own, its inputs named with its prefix.
    assert '<fieldset id="group-data">' in html
    assert 'name="data.ties"' in html and 'name="data.include_gold.present"' in html
    assert '<fieldset id="group-inputs">' in html and '<fieldset id="group-knobs">' in html
    assert 'type="submit" class="primary"' in html

    reviewer = browser_for(seeded.reviewer).get(url).text
    assert 'type="submit" class="primary"' not in reviewer
    assert re.search(r'name="epochs"[^>]*readonly', reviewer)

    # An evaluation's candidate has no default: its input starts empty and is required.
    evaluate = browser_for(seeded.admin).get(url.replace("reward", "evaluate")).text
    assert re.search(r'name="model_version_id" value="" step="1" required', evaluate)
    assert "PydanticUndefined" not in evaluate


def test_every_launchable_kind_has_a_form_with_every_knob(
    seeded: Seeded, browser_for: BrowserFor
) -> None:
    admin = browser_for(seeded.admin)
    for name in LAUNCHABLE_KINDS:
        html = admin.get(f"/admin/projects/{seeded.project.slug}/training/new/{name}").text
        config = RUN_KINDS[name].config
        for row in knob_table(config):
            annotation = config.model_fields[row["name"]].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                for sub in knob_table(annotation):
                    assert f'name="{row["name"]}.{sub["name"]}' in html, (name, sub["name"])
            else:
                assert f'name="{row["name"]}' in html, (name, row["name"])


def test_unknown_or_unlaunchable_kind_is_a_404_page(
    seeded: Seeded, browser_for: BrowserFor
) -> None:
    admin = browser_for(seeded.admin)
    base = f"/admin/projects/{seeded.project.slug}/training/new"
    for kind in ("score", "reinforce"):
        page = admin.get(f"{base}/{kind}")
        assert page.status_code == 404 and "Page not found" in page.text
        assert admin.post(f"{base}/{kind}", {"epochs": "1"}).status_code == 404


def test_launch_queues_the_run_and_goes_to_its_page(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    before = {r.id for r in runs_of(factory, seeded.project)}
    answer = browser_for(seeded.admin).post(
        f"/admin/projects/{seeded.project.slug}/training/new/reward",
        {"epochs": "2", "max_length": "64", "train_mode": "full", "learning_rate": "0.003",
         "val_fraction": "0.25", "restore_best.present": "1", "data.ties": "soft",
         "data.include_gold.present": "1", "data.margin_by_strength": '{"1": 0.5, "2": 1.5}',
         "backbone": ""},
    )  # fmt: skip
    assert answer.status_code == 303, answer.text
    new = [r for r in runs_of(factory, seeded.project) if r.id not in before]
    assert len(new) == 1
    run = new[0]
    assert answer.headers["location"] == f"/admin/runs/{run.id}"
    assert (run.kind, run.status, run.trigger, run.created_by_id) == (
        "reward", "queued", "console", seeded.admin.id,
    )  # fmt: skip
    assert run.config["epochs"] == 2 and run.config["train_mode"] == "full"
    assert run.config["learning_rate"] == 0.003 and run.config["val_fraction"] == 0.25
    assert run.config["restore_best"] is False  # its checkbox was on the form, unticked
    assert run.config["backbone"] is None
    assert run.config["data"]["ties"] == "soft"
    assert run.config["data"]["margin_by_strength"] == {"1": 0.5, "2": 1.5}
    assert run.config["data"]["include_gold"] is False
    factory.session.commit()
    event = factory.session.scalar(
        sa.select(AuditEvent).where(AuditEvent.action == "run.create",
                                    AuditEvent.target_id == run.id)
    )  # fmt: skip
    assert event is not None and event.actor_id == seeded.admin.id


@pytest.mark.parametrize(
    ("form", "field", "message"),
    [
        ({"epochs": "1000"}, "epochs", "less than or equal to 100"),
        ({"val_fraction": "1.5"}, "val_fraction", "less than 1"),
        ({"learning_rate": "0"}, "learning_rate", "greater than 0"),
        ({"batch_size": "many"}, "batch_size", "valid integer"),
        ({"data.ties": "sometimes"}, "data-ties", "Input should be"),
    ],
)
def test_a_value_outside_its_bounds_is_refused_at_its_field_and_nothing_is_queued(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor,
    form: dict[str, str], field: str, message: str,
) -> None:  # fmt: skip
    before = len(runs_of(factory, seeded.project))
    answer = browser_for(seeded.admin).post(
        f"/admin/projects/{seeded.project.slug}/training/new/reward", {"max_length": "64", **form}
    )
    assert answer.status_code == 422
    html = answer.text
    error = re.search(rf'<p class="field-error" id="f-{field}-error">([^<]+)</p>', html)
    assert error is not None and message in error[1], html
    assert "nothing was queued" in html
    assert 'name="max_length" value="64"' in html  # what was typed is kept
    assert len(runs_of(factory, seeded.project)) == before


def test_a_rule_across_knobs_is_listed_above_the_form(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    before = len(runs_of(factory, seeded.project))
    answer = browser_for(seeded.admin).post(
        f"/admin/projects/{seeded.project.slug}/training/new/reward",
        {"epochs": "0", "max_steps": "0"},
    )
    assert answer.status_code == 422 and "set epochs or max_steps" in answer.text
    assert len(runs_of(factory, seeded.project)) == before


# --- a run's page -----------------------------------------------------------------------------


def running_run(factory: Factory, seeded: Seeded, **fields: Any) -> Run:
    s = factory.session
    s.commit()
    run = Run(
        project_id=seeded.project.id, kind="ppo", status="running", trigger="console",
        config={"total_steps": 20, "learning_rate": None, "data": {"ties": "soft"}},
        created_by_id=seeded.admin.id, parent_run_id=seeded.run.id,
        snapshot_id=seeded.run.snapshot_id,
        progress_done=5, progress_total=20, worker="verdict@gpu-1", attempts=2,
        started_at=utcnow() - timedelta(seconds=60), heartbeat_at=utcnow(),
        log_tail="10:00:00 started\n10:00:30 step 5 <script>alert(1)</script>",
        **fields,
    )  # fmt: skip
    s.add(run)
    s.commit()
    return run


def test_run_page_shows_progress_eta_log_config_and_lineage(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    run = running_run(factory, seeded)
    child = add_runs(factory, seeded.project, 1, kind="evaluate", status="queued",
                     parent_run_id=run.id)[0]  # fmt: skip
    s = factory.session
    version = ModelVersion(project_id=seeded.project.id, kind="policy", version=7, name="ppo v7",
                           base_model="/models/base", status="pending", run_id=run.id)  # fmt: skip
    s.add(version)
    s.commit()

    answer = browser_for(seeded.reviewer).get(f"/admin/runs/{run.id}")
    assert answer.status_code == 200
    html = answer.text
    assert 'aria-current="page">Training' in html  # the project's tabs
    assert '<span class="badge running" data-run-status>running</span>' in html
    assert '<progress value="5" max="20"' in html and "step 5 / 20" in html
    eta = re.search(r"data-run-eta>(\d+):(\d\d):(\d\d)<", html)
    assert eta is not None  # 60 s for 5 of 20 steps: about 3 minutes left
    assert 175 <= int(eta[1]) * 3600 + int(eta[2]) * 60 + int(eta[3]) <= 190
    assert re.search(r"data-run-elapsed>0:01:0\d<", html)
    assert "verdict@gpu-1" in html and seeded.admin.email in html
    # The log tail is untrusted text: escaped, never markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "<dt>total_steps</dt><dd><code>20</code></dd>" in html
    assert "<code>{&#34;ties&#34;: &#34;soft&#34;}</code>" in html
    # Lineage: the parent, the runs it started, the versions it made, its snapshot.
    assert f'<a href="/admin/runs/{seeded.run.id}">#{seeded.run.id} reward</a>' in html
    assert f'<a href="/admin/runs/{child.id}">#{child.id} evaluate</a>' in html
    assert f'<a href="/admin/models/{version.id}">policy v7</a>' in html
    assert f"#{seeded.run.snapshot_id}" in html and "000000000000" in html
    # Live: htmx polls the fragment; the charts read metrics.json.
    assert f'hx-get="/admin/runs/{run.id}/live" hx-trigger="every 1500ms"' in html
    assert f'data-metrics="/admin/runs/{run.id}/metrics.json"' in html
    assert '<script src="/static/vendor/uplot/uPlot.iife.min.js" defer>' in html
    # A reviewer sees no cancel button; an admin does.
    assert f"/admin/runs/{run.id}/cancel" not in html
    assert (
        f"/admin/runs/{run.id}/cancel"
        in browser_for(seeded.admin).get(f"/admin/runs/{run.id}").text
    )


def test_run_page_of_a_missing_run_is_a_404_page(seeded: Seeded, browser_for: BrowserFor) -> None:
    answer = browser_for(seeded.admin).get("/admin/runs/999999")
    assert answer.status_code == 404 and "run 999999 not found" in answer.text


def test_live_fragment_polls_while_the_run_lives_and_stops_when_it_ends(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    run = running_run(factory, seeded)
    reviewer = browser_for(seeded.reviewer)
    live = reviewer.client.get(f"/admin/runs/{run.id}/live", headers={"hx-request": "true"})
    assert live.status_code == 200
    assert live.text.lstrip().startswith('<div id="run-live"')
    assert 'hx-trigger="every 1500ms"' in live.text and "hx-swap-oob" not in live.text
    assert "<html" not in live.text

    s = factory.session
    s.execute(
        sa.update(Run).where(Run.id == run.id).values(
            status="succeeded", progress_done=20, finished_at=utcnow(),
            result={"model_version_id": 3, "evaluate_run_id": 9,
                    "metrics": {"mean_score": 0.5, "train": {"loss/policy": 0.6474313139915466}}},
            log_tail="10:00:00 started\n10:05:00 succeeded",
        )
    )  # fmt: skip
    s.commit()
    ended = reviewer.get(f"/admin/runs/{run.id}/live").text
    assert "hx-trigger" not in ended and "hx-get" not in ended
    assert '<span class="badge succeeded" data-run-status>succeeded</span>' in ended
    assert "10:05:00 succeeded" in ended and "step 20 / 20" in ended
    # The result and lineage come along, out of band, so the page is complete without a reload.
    assert '<div id="run-details" class="run-details" hx-swap-oob="true">' in ended
    assert "<dt>metrics.mean_score</dt><dd>0.5</dd>" in ended
    # A nested object opens into dotted keys, its numbers written like the model pages'.
    assert "<dt>metrics.train.loss/policy</dt><dd>0.6474</dd>" in ended
    assert '<dt>evaluate_run_id</dt><dd><a href="/admin/runs/9">9</a></dd>' in ended


def test_a_reward_result_says_examples_pairs_and_the_accuracy_s_interval(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    s = factory.session
    s.execute(
        sa.update(Run).where(Run.id == seeded.run.id).values(result={"metrics": {
            "train_examples": 144, "train_pairs": 52, "val_examples": 36, "val_pairs": 12,
            "best_val_accuracy": 0.75, "best_val_accuracy_pairs": 12,
            "best_val_accuracy_ci95": [0.4676946650664343, 0.9110583316059452],
        }})
    )  # fmt: skip
    s.commit()
    html = browser_for(seeded.reviewer).get(f"/admin/runs/{seeded.run.id}").text
    assert "<dt>metrics.train_examples</dt><dd>144</dd>" in html
    assert "<dt>metrics.val_pairs</dt><dd>12</dd>" in html
    assert "<dt>metrics.best_val_accuracy_pairs</dt><dd>12</dd>" in html
    assert "<dt>metrics.best_val_accuracy_ci95</dt><dd>0.4677 to 0.9111</dd>" in html


def test_live_fragment_does_not_take_the_next_pages_flash(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    run = running_run(factory, seeded)
    admin = browser_for(seeded.admin)
    assert admin.post(f"/admin/runs/{run.id}/cancel").status_code == 303
    admin.get(f"/admin/runs/{run.id}/live")  # a poll between the redirect and the page
    assert "stopping at its next step" in admin.get(f"/admin/runs/{run.id}").text


def test_metrics_json_feeds_the_charts(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    s = factory.session
    s.add(RunMetric(run_id=seeded.run.id, step=4, name="loss/train", value=float("inf")))
    s.commit()
    answer = browser_for(seeded.reviewer).get(f"/admin/runs/{seeded.run.id}/metrics.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["accuracy/val"] == [[0, 0.5], [1, 0.6], [2, 0.7], [3, 0.8]]
    assert [p[0] for p in body["loss/train"]] == [0, 1, 2, 3, 4]
    assert body["loss/train"][-1] == [4, None]  # a diverged loss: a gap, not a broken answer


def test_sample_tables_show_untrusted_text_escaped(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    ppo = add_runs(factory, seeded.project, 1, kind="ppo", config={})[0]
    evaluation = add_runs(factory, seeded.project, 1, kind="evaluate", config={})[0]
    s = factory.session
    s.execute(sa.update(Run).where(Run.id == ppo.id).values(result={"samples": {
        "5": [{"prompt": "Say <b>hi</b>", "response": "<img src=x onerror=alert(1)>",
               "score": 0.25}],
        "10": [{"prompt": "Later prompt", "response": "Later answer", "score": -1.5}],
    }}))  # fmt: skip
    s.execute(sa.update(Run).where(Run.id == evaluation.id).values(result={"samples": [
        {"prompt": "Q <i>1</i>", "response": "candidate & co", "score": 1.0,
         "parent_response": "parent </td> answer", "parent_score": 0.5},
    ], "rule_passed": True}))  # fmt: skip
    s.commit()
    admin = browser_for(seeded.admin)

    html = admin.get(f"/admin/runs/{ppo.id}").text
    assert "Say &lt;b&gt;hi&lt;/b&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img src=x" not in html
    assert html.index("Step 10") < html.index("Step 5")  # newest step first, open
    assert "0.250" in html and "-1.500" in html

    html = admin.get(f"/admin/runs/{evaluation.id}").text
    assert "<th>Candidate</th>" in html and "<th>Parent</th>" in html
    assert "Q &lt;i&gt;1&lt;/i&gt;" in html and "candidate &amp; co" in html
    assert "parent &lt;/td&gt; answer" in html and "1.000" in html and "0.500" in html


# --- cancel and retry -------------------------------------------------------------------------


def test_cancel_a_queued_run_and_a_running_one(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    queued = add_runs(factory, seeded.project, 1, kind="generate", status="queued")[0]
    running = running_run(factory, seeded)
    admin = browser_for(seeded.admin)

    answer = admin.post(f"/admin/runs/{queued.id}/cancel")
    assert answer.status_code == 303 and answer.headers["location"] == f"/admin/runs/{queued.id}"
    assert f"Run {queued.id}: cancelled." in admin.get(f"/admin/runs/{queued.id}").text
    answer = admin.post(f"/admin/runs/{running.id}/cancel")
    assert answer.status_code == 303
    assert "stopping at its next step" in admin.get(answer.headers["location"]).text
    rows = {r.id: r for r in runs_of(factory, seeded.project)}
    assert rows[queued.id].status == "cancelled"
    assert rows[running.id].status == "running" and rows[running.id].cancel_requested

    # An ended run: nothing to cancel, said on its page.
    answer = admin.post(f"/admin/runs/{seeded.run.id}/cancel")
    assert answer.status_code == 303
    page = admin.get(f"/admin/runs/{seeded.run.id}").text
    assert "has already ended (succeeded); nothing to cancel" in page and "flash bad" in page
    factory.session.commit()
    assert (
        factory.session.scalar(
            sa.select(sa.func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "run.cancel")
        )
        == 2
    )


def test_retry_queues_the_same_kind_and_config_as_a_child(
    seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    failed = add_runs(factory, seeded.project, 1, kind="generate", status="failed",
                      config={"limit": 3, "batch_size": 4}, error="boom")[0]  # fmt: skip
    admin = browser_for(seeded.admin)
    answer = admin.post(f"/admin/runs/{failed.id}/retry")
    assert answer.status_code == 303
    retry = runs_of(factory, seeded.project)[-1]
    assert answer.headers["location"] == f"/admin/runs/{retry.id}"
    assert (retry.kind, retry.status, retry.trigger, retry.parent_run_id, retry.created_by_id) == (
        "generate", "queued", "console", failed.id, seeded.admin.id,
    )  # fmt: skip
    assert retry.config["limit"] == 3 and retry.config["batch_size"] == 4
    factory.session.commit()
    event = factory.session.scalar(sa.select(AuditEvent).where(AuditEvent.action == "run.retry"))
    assert event is not None and event.target_id == failed.id
    assert event.data["retry_run_id"] == retry.id
    page = admin.get(f"/admin/runs/{retry.id}").text
    assert f"a retry of run {failed.id}" in page
    assert f'<a href="/admin/runs/{failed.id}">#{failed.id} generate</a>' in page

    # A live run is not retried: said on its page, nothing queued.
    count = len(runs_of(factory, seeded.project))
    answer = admin.post(f"/admin/runs/{retry.id}/retry")
    assert answer.status_code == 303 and answer.headers["location"] == f"/admin/runs/{retry.id}"
    assert "is still queued" in admin.get(f"/admin/runs/{retry.id}").text
    assert len(runs_of(factory, seeded.project)) == count


# --- statements per page ----------------------------------------------------------------------


def grow(factory: Factory, seeded: Seeded, run: Run, n: int) -> None:
    """`n` runs in the project (`n` of them children of `run`), `n` metric points and `n` model
    versions made by it."""
    add_runs(factory, seeded.project, n, kind="evaluate", created_by_id=seeded.admin.id,
             parent_run_id=run.id, error="bad\nworse")  # fmt: skip
    s = factory.session
    start = (
        s.scalar(
            sa.select(sa.func.count()).select_from(RunMetric).where(RunMetric.run_id == run.id)
        )
        or 0
    )
    s.add_all(RunMetric(run_id=run.id, step=start + i, name=f"loss/m{i % 3}", value=0.1 * i)
              for i in range(n))  # fmt: skip
    top = s.scalar(sa.select(sa.func.max(ModelVersion.version))) or 0
    s.add_all(ModelVersion(project_id=seeded.project.id, kind="policy", version=top + 1 + i,
                           name=f"v{i}", base_model="b", status="candidate", run_id=run.id)
              for i in range(n))  # fmt: skip
    s.commit()


def statements(app: FastAPI, who: Browser, urls: list[str]) -> list[int]:
    counts = []
    for url in urls:
        with counted_statements(app.state.engine) as seen:
            assert who.get(url).status_code == 200, url
        counts.append(len(seen))
    return counts


def test_pages_run_as_many_statements_for_30_rows_as_for_3(
    app: FastAPI, seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    run = running_run(factory, seeded)
    reviewer = browser_for(seeded.reviewer)
    urls = [
        f"/admin/projects/{seeded.project.slug}/training",
        f"/admin/runs/{run.id}",
        f"/admin/runs/{run.id}/live",
        f"/admin/runs/{run.id}/metrics.json",
    ]
    grow(factory, seeded, run, 3)
    few = statements(app, reviewer, urls)
    grow(factory, seeded, run, 27)
    many = statements(app, reviewer, urls)
    assert len(row_ids(reviewer.get(urls[0]).text)) == 32
    assert few == many, (few, many)


def test_snapshot_ids_are_never_loaded_for_the_run_page(
    app: FastAPI, seeded: Seeded, factory: Factory, browser_for: BrowserFor
) -> None:
    s = factory.session
    snapshot = s.get(DatasetSnapshot, seeded.run.snapshot_id)
    assert snapshot is not None
    with counted_statements(app.state.engine) as seen:
        assert browser_for(seeded.reviewer).get(f"/admin/runs/{seeded.run.id}").status_code == 200
    snapshot_reads = [q for q in seen if "dataset_snapshots" in q]
    assert snapshot_reads and all("judgment_ids" not in q for q in snapshot_reads)
