"""The audit log: its filters and pages against hand-made events, the filter parser's refusals,
and a table of every consequential action, each performed through its service and then found
in the log."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import AuditEvent, Judgment, ModelVersion
from app.services import (
    audit,
    imports,
    judgments,
    projects,
    promotion,
    prompts,
    reward_runs,
    runs,
    snapshots,
    staffing,
    users,
)
from app.services.errors import InvalidInput
from tests.conftest import TEST_PASSWORD, Factory

DAY = datetime(2026, 11, 20, tzinfo=UTC)


def event(session: Session, action: str, at: datetime, **fields: Any) -> AuditEvent:
    row = audit.record(session, action, **fields)
    row.created_at = at
    session.flush()
    return row


def ids(page: audit.AuditPage) -> list[int]:
    return [row.event.id for row in page.rows]


@pytest.fixture
def log(session: Session, factory: Factory) -> dict[str, Any]:
    """Six events: two actors, two projects, three days, several kinds of object."""
    ann, bob = factory.user("admin", "ann@example.com"), factory.user("admin", "bob@example.com")
    p, q = factory.project("p"), factory.project("q")
    session.execute(sa.delete(AuditEvent))  # the factory's own user/project events
    e = [
        event(session, "run.create", DAY, actor_id=ann.id, project_id=p.id, target=("run", 1)),
        event(session, "run.cancel", DAY + timedelta(hours=5), actor_id=bob.id,
              project_id=p.id, target=("run", 1)),
        event(session, "rater.exclude", DAY + timedelta(days=1), actor_id=ann.id,
              project_id=q.id, target=("user", 7), reason="spam"),
        event(session, "rater.include", DAY + timedelta(days=1, hours=1), actor_id=ann.id,
              project_id=q.id, target=("user", 7)),
        event(session, "user.login", DAY + timedelta(days=2), actor_id=bob.id,
              target=("user", bob.id)),
        event(session, "run.reap", DAY + timedelta(days=2, hours=3), project_id=p.id,
              target=("run", 2)),
    ]  # fmt: skip
    return {"e": [x.id for x in e], "ann": ann, "bob": bob, "p": p, "q": q}


def parse(session: Session, **params: str) -> audit.AuditFilter:
    return audit.AuditFilter.parse(session, params)


def test_each_filter_keeps_the_hand_picked_events_newest_first(
    session: Session, log: dict[str, Any]
) -> None:
    e = log["e"]
    assert ids(audit.browse_events(session)) == e[::-1]
    cases: list[tuple[dict[str, str], list[int]]] = [
        ({"actor": "ann@example.com"}, [e[3], e[2], e[0]]),
        ({"actor": "  ANN@example.com "}, [e[3], e[2], e[0]]),  # as typed
        ({"actor": str(log["bob"].id)}, [e[4], e[1]]),
        ({"action": "run.cancel"}, [e[1]]),
        ({"action": "run."}, [e[5], e[1], e[0]]),
        ({"action": "run.*"}, [e[5], e[1], e[0]]),
        ({"action": "run"}, []),  # exact, not a prefix
        ({"target_type": "run", "target_id": "1"}, [e[1], e[0]]),
        ({"target_type": "user"}, [e[4], e[3], e[2]]),
        ({"project": "q"}, [e[3], e[2]]),
        ({"project": "p", "actor": "ann@example.com"}, [e[0]]),
        # A date alone: `since` from the day's start, `until` to the day's end.
        ({"since": "2026-11-21"}, [e[5], e[4], e[3], e[2]]),
        ({"until": "2026-11-21"}, [e[3], e[2], e[1], e[0]]),
        ({"since": "2026-11-21", "until": "2026-11-21"}, [e[3], e[2]]),
        # A date-time: `until` is exclusive; without a zone it is UTC; with one, converted.
        ({"until": "2026-11-20T05:00:00"}, [e[0]]),
        ({"since": "2026-11-20T06:00:00+01:00", "until": "2026-11-21"}, [e[3], e[2], e[1]]),
    ]
    for params, expected in cases:
        assert ids(audit.browse_events(session, parse(session, **params))) == expected, params


def test_pages_follow_the_cursor_to_the_end(session: Session, log: dict[str, Any]) -> None:
    e = log["e"]
    first = audit.browse_events(session, limit=4)
    assert ids(first) == [e[5], e[4], e[3], e[2]] and first.next_before == e[2]
    second = audit.browse_events(session, before=first.next_before, limit=4)
    assert ids(second) == [e[1], e[0]] and second.next_before is None
    # Exactly a page's worth left: no empty page after it.
    exact = audit.browse_events(session, before=e[2], limit=2)
    assert ids(exact) == [e[1], e[0]] and exact.next_before is None
    # With a filter, the cursor pages within it.
    runs_only = parse(session, action="run.")
    page = audit.browse_events(session, runs_only, limit=2)
    assert ids(page) == [e[5], e[1]]
    assert ids(audit.browse_events(session, runs_only, before=page.next_before, limit=2)) == [e[0]]
    assert len(audit.browse_events(session, limit=10_000).rows) == 6  # capped, not refused
    assert audit.browse_events(session, limit=0).next_before == e[5]  # at least one


def test_rows_carry_the_actor_email_the_project_slug_and_a_pair_s_prompt(
    session: Session, factory: Factory
) -> None:
    admin = factory.user("admin", "root@example.com")
    project = factory.project("rows")
    pair = factory.pair(project)
    event(session, "pair.gold", DAY, actor_id=admin.id, project_id=project.id,
          target=("pair", pair.id), choice="a")  # fmt: skip
    event(session, "run.reap", DAY, target=("pair", 999_999))  # a pair since deleted
    newest, gold = audit.browse_events(session, parse(session, until="2026-11-20")).rows
    assert (gold.actor_email, gold.project_slug, gold.prompt_id) == (
        "root@example.com", "rows", pair.prompt_id,
    )  # fmt: skip
    assert (newest.actor_email, newest.project_slug, newest.prompt_id) == (None, None, None)


def test_a_prefix_s_underscore_is_a_character_not_a_wildcard(
    session: Session, factory: Factory
) -> None:
    session.execute(sa.delete(AuditEvent))
    keep = event(session, "model_x.promote", DAY)
    event(session, "modelYx.promote", DAY)
    assert ids(audit.browse_events(session, parse(session, action="model_x."))) == [keep.id]


def test_bad_filters_are_refused_each_at_its_field(session: Session, log: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(
            session, actor="nobody@example.com", project="nope", target_id="12a",
            since="yesterday", until="2026-13-01",
        )  # fmt: skip
    fields = {e.field: e.message for e in caught.value.errors}
    assert fields == {
        "actor": "no user with the email or id 'nobody@example.com'",
        "project": "no project with the slug 'nope'",
        "target_id": "an object id is a whole number, not '12a'",
        "since": "'yesterday' is not a date (YYYY-MM-DD) or an ISO date-time",
        "until": "'2026-13-01' is not a date (YYYY-MM-DD) or an ISO date-time",
    }
    with pytest.raises(InvalidInput) as caught:
        parse(session, since="2026-11-22", until="2026-11-21")
    assert [e.field for e in caught.value.errors] == ["until"]
    with pytest.raises(InvalidInput, match="no user"):
        parse(session, actor="999999")
    assert parse(session) == audit.AuditFilter()  # nothing typed: no filter


# Every consequential action, performed through its service, appears in the log. ----------


class World:
    """What the actions need: an admin, a rater, a project with a judged pair, a queued run."""

    def __init__(self, session: Session, factory: Factory, settings: Settings) -> None:
        self.session, self.settings = session, settings
        self.admin = factory.user("admin")
        self.rater = factory.user("rater")
        self.project = factory.project()
        self.pair = factory.pair(self.project)
        session.add(
            Judgment(project_id=self.project.id, pair_id=self.pair.id, rater_id=self.rater.id,
                     choice="a", strength=1)
        )  # fmt: skip
        session.flush()

    def versions(self) -> tuple[ModelVersion, ModelVersion]:
        """Reward v1 (active) and v2 (a trained candidate)."""
        rows = [
            ModelVersion(project_id=self.project.id, kind="reward", version=v, name=f"r{v}",
                         base_model="/m", artifact_path=f"/a/{v}", status=status)
            for v, status in ((1, "active"), (2, "candidate"))
        ]  # fmt: skip
        self.session.add_all(rows)
        self.session.flush()
        return rows[0], rows[1]


def _run(w: World) -> Any:
    return runs.create_run(
        w.session, w.project, "generate", settings=w.settings, actor_id=w.admin.id
    )


def _retry(w: World) -> Any:
    run = runs.cancel_run(w.session, _run(w), settings=w.settings, actor_id=w.admin.id)
    return runs.retry_run(w.session, run, settings=w.settings, actor_id=w.admin.id)


def _rollback(w: World) -> Any:
    v1, v2 = w.versions()
    promotion.promote(w.session, v2, actor_id=w.admin.id)
    return promotion.rollback(w.session, v1, actor_id=w.admin.id)


def _auto_promote(w: World) -> Any:
    v1, v2 = w.versions()
    v2.metrics = {"best_val_accuracy": 0.9}
    reward_runs.settle_reward_version(w.session, w.project, v2)
    return v2


def _accept(w: World) -> Any:
    issued = users.create_invite(w.session, role="rater", actor=w.admin)
    return users.accept_invite(w.session, issued.secret, "new@example.com", TEST_PASSWORD)


def _staff_remove(w: World) -> Any:
    staffing.add_member(w.session, w.project, w.rater, actor_id=w.admin.id)
    return staffing.remove_member(w.session, w.project, w.rater.id, actor=w.admin)


def _import(w: World) -> Any:
    record = imports.PreferenceRecord(1, [{"role": "user", "content": "hi?"}], "hello", "go away")
    return imports.store_preferences(
        w.session, w.project, [record], source="hh", actor_id=w.admin.id
    )


ACTIONS: list[tuple[str, Callable[[World], Any]]] = [
    ("project.create", lambda w: projects.create_project(w.session, "new", "New",
                                                         actor_id=w.admin.id)),
    ("project.update", lambda w: projects.update_project(w.session, w.project, name="Renamed",
                                                         actor_id=w.admin.id)),
    ("prompts.upload", lambda w: prompts.store_prompts(
        w.session, w.project, [prompts.PromptRecord(line=1, text="Why?")], source="upload",
        actor_id=w.admin.id)),
    ("preferences.import", _import),
    ("pair.gold", lambda w: judgments.set_gold(w.session, w.pair.id, "a", actor_id=w.admin.id)),
    ("snapshot.create", lambda w: snapshots.create_snapshot(w.session, w.project,
                                                            actor_id=w.admin.id)),
    ("run.create", _run),
    ("run.cancel", lambda w: runs.cancel_run(w.session, _run(w), settings=w.settings,
                                             actor_id=w.admin.id)),
    ("run.retry", _retry),
    ("model.promote", lambda w: promotion.promote(w.session, w.versions()[1], actor_id=w.admin.id)),
    ("model.rollback", _rollback),
    ("model.promote", _auto_promote),  # the closed loop's, by no one
    ("user.create", lambda w: users.create_user(w.session, "x@example.com", TEST_PASSWORD,
                                                "rater", actor_id=w.admin.id)),
    ("user.login", lambda w: users.authenticate(w.session, w.admin.email, TEST_PASSWORD)),
    ("user.password", lambda w: users.set_password(w.session, w.admin, "another long password")),
    ("user.role", lambda w: users.set_role(w.session, w.rater.id, "reviewer", actor=w.admin)),
    ("user.deactivate", lambda w: users.set_active(w.session, w.rater.id, False, actor=w.admin)),
    ("user.reactivate", lambda w: (
        users.set_active(w.session, w.rater.id, False, actor=w.admin),
        users.set_active(w.session, w.rater.id, True, actor=w.admin))),
    ("token.create", lambda w: users.create_token(w.session, w.admin, "ci")),
    ("token.revoke", lambda w: users.revoke_token(
        w.session, users.create_token(w.session, w.admin, "ci").token.id, w.admin)),
    ("invite.create", lambda w: users.create_invite(w.session, role="rater", actor=w.admin)),
    ("invite.revoke", lambda w: users.revoke_invite(
        w.session, users.create_invite(w.session, role="rater", actor=w.admin).invite.id,
        actor=w.admin)),
    ("invite.accept", _accept),
    ("project.staff.add", lambda w: staffing.add_member(w.session, w.project, w.rater,
                                                        actor_id=w.admin.id)),
    ("project.staff.remove", _staff_remove),
]  # fmt: skip


@pytest.mark.parametrize(("action", "perform"), ACTIONS, ids=[a for a, _ in ACTIONS])
def test_every_consequential_action_is_audited(
    action: str,
    perform: Callable[[World], Any],
    session: Session,
    factory: Factory,
    settings: Settings,
) -> None:
    world = World(session, factory, settings)
    before = session.scalar(sa.select(sa.func.max(AuditEvent.id))) or 0
    perform(world)
    session.flush()
    found = audit.browse_events(session, parse(session, action=action)).rows
    new = [row.event for row in found if row.event.id > before]
    assert new, f"{action} left no audit event"
    assert new[0].target_type is not None or new[0].project_id == world.project.id
