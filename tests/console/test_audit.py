"""The console's audit log: its table with links to each object, the filters and the pager as
GET parameters, a refused filter at its field, escaping of what people typed, and the link from
a project's summary. Who may open it is checked by test_access.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from html import unescape

import sqlalchemy as sa

from app.models import AuditEvent, User
from app.services import audit
from tests.conftest import Factory
from tests.console.conftest import Browser, Seeded, counted_statements

Browse = Callable[[User | None], Browser]


def rows(html: str) -> list[str]:
    return re.findall(r'<tr id="event-(\d+)">', html)


def test_the_log_links_each_object_and_shows_its_data_escaped(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    reviewer = browser_for(seeded.reviewer)  # logs in: an event, deleted with the others
    s = factory.session
    s.execute(sa.delete(AuditEvent))
    p = seeded.project.id
    made = [
        audit.record(s, "run.cancel", actor_id=seeded.admin.id, project_id=p,
                     target=("run", seeded.run.id)),
        audit.record(s, "model.promote", actor_id=seeded.admin.id, project_id=p,
                     target=("model_version", seeded.policy.id), reason="<b>better</b>"),
        audit.record(s, "pair.gold", actor_id=seeded.admin.id, project_id=p,
                     target=("pair", seeded.pair.id), choice="a"),
        audit.record(s, "user.role", actor_id=seeded.admin.id, target=("user", seeded.rater.id),
                     before="rater", after="reviewer"),
        audit.record(s, "moderation.exclude", actor_id=seeded.admin.id, project_id=p,
                     target=("prompt", seeded.prompt.id)),
        audit.record(s, "token.create", actor_id=seeded.rater.id, target=("api_token", 3)),
        audit.record(s, "run.reap", project_id=p, target=("run", seeded.run.id),
                     note="x" * 200),
    ]  # fmt: skip
    s.commit()

    answer = reviewer.get("/admin/audit")
    assert answer.status_code == 200
    html = answer.text
    assert rows(html) == [str(e.id) for e in made][::-1]
    assert f'href="/admin/runs/{seeded.run.id}">run {seeded.run.id}</a>' in html
    assert f'href="/admin/models/{seeded.policy.id}">model version {seeded.policy.id}</a>' in html
    pair_page = f"/admin/projects/console/prompts/{seeded.prompt.id}#pair-{seeded.pair.id}"
    assert f'href="{pair_page}">pair {seeded.pair.id}</a>' in html
    assert f'href="/admin/people#user-{seeded.rater.id}">user {seeded.rater.id}</a>' in html
    assert "api token 3</a>" not in html and "api token 3" in html  # no page to link to
    # What someone typed is text, never markup; long values are cut, the title has them all.
    assert "<b>better</b>" not in html and "&lt;b&gt;better&lt;/b&gt;" in html
    assert "x" * 59 + "…" in html and "x" * 200 in unescape(html)
    assert f'href="/admin/projects/console/prompts/{seeded.prompt.id}">prompt ' in html
    reap = html.split(f'id="event-{made[-1].id}"')[1].split("</tr>")[0]
    assert '<span class="muted">system</span>' in reap
    # Each actor, action and object leads to its own filtered log.
    assert f'href="/admin/audit?actor={seeded.admin.id}"' in html
    assert 'href="/admin/audit?action=model.promote"' in html
    assert f'href="/admin/audit?target_type=run&amp;target_id={seeded.run.id}"' in html


def test_filters_and_older_pages_are_get_parameters(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    browser = browser_for(seeded.admin)
    s = factory.session
    s.execute(sa.delete(AuditEvent))
    made = [
        audit.record(s, "rater.exclude", actor_id=seeded.admin.id, project_id=seeded.project.id,
                     target=("user", seeded.rater.id))
        for _ in range(audit.PAGE_SIZE + 3)
    ]  # fmt: skip
    audit.record(s, "user.login", actor_id=seeded.reviewer.id)
    s.commit()

    first = browser.get(f"/admin/audit?project=console&actor={seeded.admin.email}").text
    assert rows(first) == [str(e.id) for e in made[::-1][: audit.PAGE_SIZE]]
    assert f'value="{seeded.admin.email}"' in first  # the form keeps what was typed
    assert '<option value="console" selected>' in first
    older = re.search(r'<a href="(/admin/audit\?[^"]+)">Older</a>', first)
    assert older is not None
    url = unescape(older[1])
    assert "project=console" in url and f"before={made[3].id}" in url
    second = browser.get(url).text
    assert rows(second) == [str(e.id) for e in made[2::-1]]
    assert "Older</a>" not in second and ">Newest</a>" in second

    with counted_statements(browser.client.app.state.engine) as statements:  # type: ignore[attr-defined]
        browser.get("/admin/audit?action=rater.")
    audit_queries = [q for q in statements if "audit_events" in q]
    assert len(audit_queries) == 1  # one query for the page, however many rows it shows

    none = browser.get("/admin/audit?action=model.").text
    assert rows(none) == [] and "No event matches these filters." in none


def test_a_filter_naming_nothing_is_refused_at_its_field(
    seeded: Seeded, browser_for: Browse
) -> None:
    answer = browser_for(seeded.admin).get("/admin/audit?actor=ghost%40example.com&since=never")
    assert answer.status_code == 422
    html = answer.text
    assert 'id="f-actor-error">no user with the email or id &#39;ghost@example.com&#39;' in html
    assert 'id="f-since-error">&#39;never&#39; is not a date' in html
    assert 'aria-invalid="true"' in html and rows(html) == []


def test_a_project_s_summary_links_to_its_own_log(seeded: Seeded, browser_for: Browse) -> None:
    html = browser_for(seeded.reviewer).get("/admin/projects/console").text
    assert 'href="/admin/audit?project=console"' in html
    page = browser_for(seeded.reviewer).get("/admin/audit?project=console").text
    assert 'Audit log <span class="muted">· Console</span>' in page
