"""People, invitations, staffing and the account pages: each answer and the rows it leaves.

The /admin routes are also tried per role by test_access.py; the account and invite pages are
not under /admin, so their anonymous / rater / reviewer / admin and CSRF checks are here.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from app.core.db import make_engine, make_sessionmaker
from app.core.security import hash_api_token
from app.models import (
    ApiToken,
    AuditEvent,
    Invite,
    Judgment,
    Project,
    ProjectMember,
    User,
    utcnow,
)
from app.services import staffing, users
from app.services.errors import Conflict
from tests.conftest import Factory, bearer
from tests.console.conftest import Browser, Seeded, counted_statements

Browse = Callable[[User | None], Browser]
LINK = re.compile(r'<p class="secret" id="invite-link">[^<]*?/invite/([A-Za-z0-9_-]+)</p>')
SECRET = re.compile(r'<p class="secret" id="token-secret">(vd_[A-Za-z0-9_-]+)</p>')
FORM_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def fresh(factory: Factory, model: type[Any], row_id: int) -> Any:
    """The row as the database holds it now (the app wrote it in another session)."""
    factory.session.commit()
    factory.session.expire_all()
    return factory.session.get(model, row_id)


def audited(factory: Factory, action: str) -> list[AuditEvent]:
    factory.session.commit()
    return list(factory.session.scalars(sa.select(AuditEvent).where(AuditEvent.action == action)))


def invite(factory: Factory, admin: User, **fields: Any) -> users.IssuedInvite:
    factory.session.commit()
    issued = users.create_invite(factory.session, actor=admin, **{"role": "rater", **fields})
    factory.session.commit()
    return issued


def staff(factory: Factory, project: Project, *raters: User) -> None:
    factory.session.commit()
    for rater in raters:
        staffing.add_member(factory.session, project, rater)
    factory.session.commit()


# The People page ------------------------------------------------------------------------


def test_people_page_lists_everyone_and_the_pending_invites(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    staff(factory, seeded.project, seeded.rater)
    factory.token(seeded.rater)
    factory.token(seeded.rater)
    revoked = factory.token_row(factory.token(seeded.rater))
    users.revoke_token(factory.session, revoked.id, seeded.rater)
    factory.session.commit()
    staffed = invite(factory, seeded.admin, note="for Ada", project_slug=seeded.project.slug)
    expired = invite(factory, seeded.admin, note="too late")
    row = fresh(factory, Invite, expired.invite.id)
    row.expires_at = utcnow() - timedelta(minutes=1)
    factory.session.commit()

    page = browser_for(seeded.admin).get("/admin/people")
    assert page.status_code == 200
    html = page.text
    for person in (seeded.admin, seeded.reviewer, seeded.rater):
        assert person.email in html
    rater_row = html.split(f'id="user-{seeded.rater.id}"')[1].split("</tr>")[0]
    assert (
        seeded.project.name in rater_row
        and f"/admin/projects/{seeded.project.slug}/staff" in rater_row
    )
    assert '<td class="num" data-label="API tokens">2</td>' in rater_row  # live ones only
    assert f'action="/admin/people/{seeded.rater.id}/deactivate"' in rater_row
    assert "for Ada" in html and "seeded" in html and "too late" not in html  # pending only
    assert f"/admin/people/invites/{staffed.invite.id}/revoke" in html
    assert staffed.secret not in html and "/invite/" not in html  # never the link again
    # The admin's own row has no deactivate button and no role select.
    own = html.split(f'id="user-{seeded.admin.id}"')[1].split("</tr>")[0]
    assert "/deactivate" not in own and "<select" not in own


def test_reviewers_see_people_read_only(seeded: Seeded, browser_for: Browse) -> None:
    html = browser_for(seeded.reviewer).get("/admin/people").text
    assert seeded.rater.email in html and "seeded" in html
    assert html.count('method="post"') == 1  # the top bar's log out, nothing else
    assert "/deactivate" not in html and "/admin/people/invites" not in html
    assert "Admins invite people" in html


def test_admin_creates_an_invite_and_sees_its_link_once(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    admin = browser_for(seeded.admin)
    answer = admin.post(
        "/admin/people/invites",
        {"role": "rater", "note": "night shift", "project": seeded.project.slug,
         "expires_in_days": "3"},
    )  # fmt: skip
    assert answer.status_code == 201
    html = answer.text
    link = LINK.search(html)
    assert link is not None, html
    assert 'data-copy="#invite-link"' in html
    secret = link[1]
    factory.session.commit()
    row = factory.session.scalar(sa.select(Invite).where(Invite.note == "night shift"))
    assert row is not None
    assert row.token_hash == hash_api_token(secret) and secret not in row.token_hash
    assert row.role == "rater" and row.project_id == seeded.project.id
    assert row.created_by_id == seeded.admin.id
    assert timedelta(days=3) - (row.expires_at - row.created_at) < timedelta(seconds=5)
    assert [e.target_id for e in audited(factory, "invite.create")][-1] == row.id
    again = admin.get("/admin/people").text
    assert secret not in again and "night shift" in again


@pytest.mark.parametrize(
    ("form", "field", "message"),
    [
        ({"role": "owner"}, "invite-role", "pick a role"),
        ({"expires_in_days": "0"}, "invite-days", "1 to 30"),
        ({"expires_in_days": "31"}, "invite-days", "1 to 30"),
        ({"expires_in_days": "soon"}, "invite-days", "1 to 30"),
        ({"project": "nope"}, "invite-project", "no project"),
        ({"role": "reviewer", "project": "console"}, "invite-project", "only raters"),
        ({"note": "x" * 201}, "invite-note", "at most 200"),
    ],
)
def test_invite_form_refuses_at_the_field(
    seeded: Seeded,
    factory: Factory,
    browser_for: Browse,
    form: dict[str, str],
    field: str,
    message: str,
) -> None:
    before = factory.count(Invite)
    answer = browser_for(seeded.admin).post(
        "/admin/people/invites", {"role": "rater", "expires_in_days": "7", **form}
    )
    assert answer.status_code == 422
    html = answer.text
    error = re.search(rf'<p class="field-error" id="{field}-error">([^<]*)</p>', html)
    assert error is not None and message in error[1], html
    assert factory.count(Invite) == before


def test_revoking_an_invite_kills_its_link(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    issued = invite(factory, seeded.admin)
    admin = browser_for(seeded.admin)
    done = admin.post(f"/admin/people/invites/{issued.invite.id}/revoke")
    assert done.status_code == 303
    assert fresh(factory, Invite, issued.invite.id).revoked_at is not None
    assert audited(factory, "invite.revoke")[0].actor_id == seeded.admin.id
    gone = browser_for(None).get(issued.path)
    assert gone.status_code == 410 and "revoked" in gone.text
    missing = admin.post("/admin/people/invites/999999/revoke")
    assert missing.status_code == 404


def test_changing_a_role(seeded: Seeded, factory: Factory, browser_for: Browse) -> None:
    admin = browser_for(seeded.admin)
    done = admin.post(f"/admin/people/{seeded.rater.id}/role", {"role": "reviewer"})
    assert done.status_code == 303
    assert fresh(factory, User, seeded.rater.id).role == "reviewer"
    event = audited(factory, "user.role")[0]
    assert event.data == {"before": "rater", "after": "reviewer"}
    assert event.actor_id == seeded.admin.id
    bad = admin.post(f"/admin/people/{seeded.rater.id}/role", {"role": "boss"})
    assert bad.status_code == 422 and "pick a role" in bad.text
    own = admin.post(f"/admin/people/{seeded.admin.id}/role", {"role": "rater"})
    assert own.status_code == 409
    assert "You cannot change your own role" in own.text
    assert fresh(factory, User, seeded.admin.id).role == "admin"


def test_deactivation_stops_sessions_and_tokens_at_once(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    rater = browser_for(seeded.rater)
    token = bearer(factory.token(seeded.rater))
    assert rater.get("/", follow_redirects=False).status_code == 200
    assert rater.client.get("/api/v1/me", headers=token).status_code == 200
    admin = browser_for(seeded.admin)
    done = admin.post(f"/admin/people/{seeded.rater.id}/deactivate")
    assert done.status_code == 303
    assert fresh(factory, User, seeded.rater.id).is_active is False
    assert audited(factory, "user.deactivate")[0].target_id == seeded.rater.id
    # The very next requests: the browser session and the token authenticate nobody.
    home = rater.get("/", follow_redirects=False)
    assert home.status_code == 303 and home.headers["location"] == "/login"
    assert rater.client.get("/api/v1/me").status_code == 401  # the session was cleared
    assert rater.client.get("/api/v1/me", headers=token).status_code == 401
    assert rater.get("/account/tokens", follow_redirects=False).status_code == 303
    listed = admin.get("/admin/people").text
    assert f'action="/admin/people/{seeded.rater.id}/reactivate"' in listed
    # Reactivated: the token works again, and the rater can log in.
    assert admin.post(f"/admin/people/{seeded.rater.id}/reactivate").status_code == 303
    assert rater.client.get("/api/v1/me", headers=token).status_code == 200
    assert browser_for(seeded.rater).get("/").status_code == 200


def test_an_admin_cannot_deactivate_themself(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    answer = browser_for(seeded.admin).post(f"/admin/people/{seeded.admin.id}/deactivate")
    assert answer.status_code == 409
    assert "You cannot deactivate yourself" in answer.text
    assert fresh(factory, User, seeded.admin.id).is_active is True
    assert audited(factory, "user.deactivate") == []


def test_the_last_active_admin_stays(factory: Factory) -> None:
    """Two admins removing each other at once: the second finds the other the last admin
    (the service locks the active admins' rows, so this holds under concurrency too)."""
    first, second = factory.user("admin"), factory.user("admin")
    s = factory.session
    users.set_active(s, second.id, False, actor=first)
    s.commit()
    with pytest.raises(Conflict, match="last active admin"):
        users.set_active(s, first.id, False, actor=second)
    s.rollback()
    with pytest.raises(Conflict, match="last active admin"):
        users.set_role(s, first.id, "reviewer", actor=second)
    s.rollback()
    assert (
        fresh(factory, User, first.id).is_active and fresh(factory, User, first.id).role == "admin"
    )
    users.set_active(s, second.id, True, actor=first)  # a second admin again: now allowed
    users.set_role(s, first.id, "reviewer", actor=second)
    s.commit()
    assert fresh(factory, User, first.id).role == "reviewer"


def test_people_page_statements_do_not_grow_with_its_rows(
    app: FastAPI, seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    admin = browser_for(seeded.admin)

    def statements() -> int:
        with counted_statements(app.state.engine) as seen:
            assert admin.get("/admin/people").status_code == 200
        return len(seen)

    few = statements()
    other = factory.project("other")
    for i in range(12):
        person = factory.user("rater" if i % 3 else "reviewer")
        factory.token(person)
        if i % 3:
            staff(factory, seeded.project if i % 2 else other, person)
        invite(factory, seeded.admin, note=f"n{i}", project_slug="console" if i % 2 else "")
    assert statements() == few


def test_people_are_paged_by_email(seeded: Seeded, factory: Factory, browser_for: Browse) -> None:
    s = factory.session
    first = users.people(s, limit=2)
    assert [p.user.email for p in first.people] == sorted(
        [seeded.admin.email, seeded.reviewer.email, seeded.rater.email]
    )[:2]
    assert first.next_after is not None
    rest = users.people(s, after=first.next_after, limit=2)
    assert len(rest.people) == 1 and rest.next_after is None
    raters = users.people(s, role="rater")
    assert [p.user.id for p in raters.people] == [seeded.rater.id]


# The Staff tab ----------------------------------------------------------------------------


def test_staff_tab_adds_and_removes_raters(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    url = f"/admin/projects/{seeded.project.slug}/staff"
    other = factory.user(email="zed@example.com")
    admin = browser_for(seeded.admin)
    page = admin.get(url).text
    assert "Open to every rater" in page and f'<option value="{other.id}">' in page
    assert 'aria-current="page">Staff<' in page
    by_email = admin.post(url, {"email": seeded.rater.email.upper()})
    assert by_email.status_code == 303
    from_select = admin.post(url, {"user_id": str(other.id)})
    assert from_select.status_code == 303
    factory.session.commit()
    assert set(factory.session.scalars(sa.select(ProjectMember.user_id))) == {
        seeded.rater.id, other.id,
    }  # fmt: skip
    assert len(audited(factory, "project.staff.add")) == 2
    page = admin.get(url).text
    assert "Staffed: only its staff rate this project" in page
    # The seeded rater has one judgment in the project.
    rater_row = page.split(f'id="member-{seeded.rater.id}"')[1].split("</tr>")[0]
    assert '<td class="num" data-label="Judgments here">1</td>' in rater_row
    bad = admin.post(url, {"email": seeded.reviewer.email})
    assert bad.status_code == 422 and "only raters are staffed" in bad.text
    assert 'id="staff-email-error"' in bad.text
    assert admin.post(url, {}).status_code == 422
    removed = admin.post(f"{url}/{other.id}/remove")
    assert removed.status_code == 303
    assert "zed@example.com is off the staff" in admin.get(url).text
    last = admin.post(f"{url}/{seeded.rater.id}/remove")
    assert last.status_code == 303
    assert "every rater may rate it" in admin.get(url).text
    assert factory.count(ProjectMember) == 0
    assert len(audited(factory, "project.staff.remove")) == 2
    assert admin.post(f"{url}/{other.id}/remove").status_code == 404


def test_staff_tab_is_read_only_for_reviewers(seeded: Seeded, browser_for: Browse) -> None:
    html = browser_for(seeded.reviewer).get(f"/admin/projects/{seeded.project.slug}/staff").text
    assert "Admins staff raters" in html and "/remove" not in html


def test_staff_tab_statements_do_not_grow_with_its_members(
    app: FastAPI, seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    admin = browser_for(seeded.admin)
    url = f"/admin/projects/{seeded.project.slug}/staff"

    def statements() -> int:
        with counted_statements(app.state.engine) as seen:
            assert admin.get(url).status_code == 200
        return len(seen)

    staff(factory, seeded.project, seeded.rater)
    few = statements()
    staff(factory, seeded.project, *[factory.user() for _ in range(10)])
    factory.user()  # a candidate
    assert statements() == few


# The rater's side: start page and rate page -----------------------------------------------


def test_raters_see_and_rate_only_the_projects_they_may(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    open_project = factory.project("open-one")
    factory.pair(open_project)
    outsider = factory.user()
    staff(factory, seeded.project, seeded.rater)
    member_home = browser_for(seeded.rater).get("/").text
    assert "/p/console/rate" in member_home and "/p/open-one/rate" in member_home
    outsider_browser = browser_for(outsider)
    home = outsider_browser.get("/").text
    assert "/p/console/rate" not in home and "/p/open-one/rate" in home
    refused = outsider_browser.get("/p/console/rate")
    assert refused.status_code == 403
    assert "not on the staff" in refused.text and "Back to your projects" in refused.text
    assert outsider_browser.get("/p/open-one/rate").status_code == 200
    assert browser_for(seeded.rater).get("/p/console/rate").status_code == 200
    reviewer_home = browser_for(seeded.reviewer).get("/").text
    assert "/p/console/rate" in reviewer_home


def test_a_rater_with_no_project_is_told_why(factory: Factory, browser_for: Browse) -> None:
    project = factory.project()
    staff(factory, project, factory.user())
    html = browser_for(factory.user()).get("/").text
    assert "No project is open to you yet" in html


# Own API tokens ---------------------------------------------------------------------------


def test_tokens_page_by_role(seeded: Seeded, browser_for: Browse) -> None:
    anonymous = browser_for(None).get("/account/tokens", follow_redirects=False)
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == "/login?next=/account/tokens"
    posted = browser_for(None).post("/account/tokens", {"name": "x"})
    assert posted.status_code == 303
    for who in (seeded.rater, seeded.reviewer, seeded.admin):
        page = browser_for(who).get("/account/tokens")
        assert page.status_code == 200
        assert who.email in page.text and "Create a token" in page.text


def test_creating_listing_and_revoking_own_tokens(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    rater = browser_for(seeded.rater)
    created = rater.post("/account/tokens", {"name": "labeling script"})
    assert created.status_code == 201
    found = SECRET.search(created.text)
    assert found is not None and 'data-copy="#token-secret"' in created.text
    secret = found[1]
    row = factory.token_row(secret)
    assert row.user_id == seeded.rater.id and row.name == "labeling script"
    assert audited(factory, "token.create")[-1].target_id == row.id
    assert rater.client.get("/api/v1/me", headers=bearer(secret)).json()["id"] == seeded.rater.id
    listed = rater.get("/account/tokens").text
    assert secret not in listed and row.prefix in listed and "labeling script" in listed
    assert 'id="token-secret"' not in listed
    row_html = listed.split(f'id="token-{row.id}"')[1].split("</tr>")[0]
    assert "<time" in row_html.split("</td>")[3]  # last used: just now, by /me
    revoked = rater.post(f"/account/tokens/{row.id}/revoke")
    assert revoked.status_code == 303
    assert fresh(factory, ApiToken, row.id).revoked_at is not None
    assert audited(factory, "token.revoke")[-1].target_id == row.id
    assert rater.client.get("/api/v1/me", headers=bearer(secret)).status_code == 401
    assert "revoked" in rater.get("/account/tokens").text
    empty = rater.post("/account/tokens", {"name": "  "})
    assert empty.status_code == 422 and "needs a name" in empty.text


def test_another_users_token_is_not_found_even_for_an_admin(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    theirs = factory.token_row(factory.token(seeded.rater))
    for who in (seeded.reviewer, seeded.admin):
        answer = browser_for(who).post(f"/account/tokens/{theirs.id}/revoke")
        assert answer.status_code == 404
    assert fresh(factory, ApiToken, theirs.id).revoked_at is None
    admin_page = browser_for(seeded.admin).get("/account/tokens").text
    assert theirs.prefix not in admin_page and "No tokens yet" in admin_page


def test_account_writes_need_the_csrf_token(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    own = factory.token_row(factory.token(seeded.rater))
    rater = browser_for(seeded.rater)
    for path in ("/account/tokens", f"/account/tokens/{own.id}/revoke"):
        refused = rater.client.post(
            path, data={"name": "sneaky"}, headers={"accept": "text/html"}, follow_redirects=False
        )
        assert refused.status_code == 403 and "CSRF" in refused.text
    assert fresh(factory, ApiToken, own.id).revoked_at is None
    assert factory.count(ApiToken) == 1


# Accepting an invite ----------------------------------------------------------------------


def accept(browser: Browser, path: str, **form: str) -> Any:
    page = browser.get(path)
    token = FORM_CSRF.search(page.text)
    assert token is not None, page.text
    return browser.client.post(
        path,
        data={"csrf_token": token[1], **form},
        headers={"accept": "text/html"},
        follow_redirects=False,
    )


def test_accepting_an_invite_makes_the_account_and_logs_in(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    issued = invite(factory, seeded.admin, project_slug=seeded.project.slug)
    visitor = browser_for(None)
    form = visitor.get(issued.path)
    assert form.status_code == 200
    assert "invited as a <strong>rater</strong>" in form.text
    assert seeded.project.name in form.text
    before = visitor.client.cookies.get("verdict_session")
    answer = accept(visitor, issued.path, email=" New@Example.com ", password="long enough")
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    assert visitor.client.cookies.get("verdict_session") != before  # a fresh session
    home = visitor.get("/")
    assert home.status_code == 200 and "new@example.com · rater" in home.text
    factory.session.commit()
    made = users.get_user_by_email(factory.session, "new@example.com")
    assert made is not None and made.role == "rater" and made.last_login_at is not None
    used = fresh(factory, Invite, issued.invite.id)
    assert used.used_at is not None and used.used_by_id == made.id
    assert factory.session.scalar(
        sa.select(ProjectMember).where(
            ProjectMember.project_id == seeded.project.id, ProjectMember.user_id == made.id
        )
    )
    accepted = audited(factory, "invite.accept")
    assert [(e.actor_id, e.target_id) for e in accepted] == [(made.id, issued.invite.id)]
    # The new session's CSRF token works for a write.
    meta = re.search(r'<meta name="csrf-token" content="([^"]+)"', home.text)
    assert meta is not None
    made_token = visitor.client.post(
        "/account/tokens",
        data={"csrf_token": meta[1], "name": "mine"},
        headers={"accept": "text/html"},
        follow_redirects=False,
    )
    assert made_token.status_code == 201
    # Single use: the link now says so, whether opened or sent again.
    again = browser_for(None).get(issued.path)
    assert again.status_code == 410 and "already used" in again.text
    resent = visitor.client.post(
        issued.path,
        data={"csrf_token": meta[1], "email": "other@example.com", "password": "long enough"},
        headers={"accept": "text/html"},
        follow_redirects=False,
    )
    assert resent.status_code == 410 and "already used" in resent.text
    factory.session.commit()
    assert users.get_user_by_email(factory.session, "other@example.com") is None


def test_unusable_invites_say_which(seeded: Seeded, factory: Factory, browser_for: Browse) -> None:
    expired = invite(factory, seeded.admin)
    row = fresh(factory, Invite, expired.invite.id)
    row.expires_at = utcnow() - timedelta(seconds=1)
    revoked = invite(factory, seeded.admin)
    users.revoke_invite(factory.session, revoked.invite.id, actor=seeded.admin)
    factory.session.commit()
    visitor = browser_for(None)
    for path, code, words in (
        (expired.path, 410, "has expired"),
        (revoked.path, 410, "was revoked"),
        ("/invite/not-a-real-secret", 404, "not valid"),
    ):
        got = visitor.get(path)
        assert got.status_code == code and words in got.text, path
        posted = visitor.client.post(
            path, data={"csrf_token": "x"}, headers={"accept": "text/html"}
        )
        assert posted.status_code == 403  # CSRF first: the form's token is the session's
    # With the session's CSRF token, a POST to a dead link answers the same page.
    page = visitor.get(expired.path)
    token = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert token is not None
    dead = visitor.client.post(
        expired.path,
        data={"csrf_token": token[1], "email": "late@example.com", "password": "long enough"},
        headers={"accept": "text/html"},
    )
    assert dead.status_code == 410 and "has expired" in dead.text
    assert factory.count(User) == 3


def test_invite_form_errors_leave_the_invite_unused(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    issued = invite(factory, seeded.admin, role="reviewer")
    visitor = browser_for(None)
    short = accept(visitor, issued.path, email="r@example.com", password="short")
    assert short.status_code == 422 and "at least 8 characters" in short.text
    assert 'id="password-error"' in short.text
    taken = accept(visitor, issued.path, email=seeded.rater.email, password="long enough")
    assert taken.status_code == 422 and "already exists" in taken.text
    assert 'id="email-error"' in taken.text
    bad = accept(visitor, issued.path, email="not-an-email", password="long enough")
    assert bad.status_code == 422 and "is not an email address" in bad.text
    assert fresh(factory, Invite, issued.invite.id).used_at is None
    assert factory.count(User) == 3 and audited(factory, "invite.accept") == []
    ok = accept(visitor, issued.path, email="r@example.com", password="long enough")
    assert ok.status_code == 303
    factory.session.commit()
    made = users.get_user_by_email(factory.session, "r@example.com")
    assert made is not None and made.role == "reviewer"
    assert factory.count(ProjectMember) == 0


def test_invite_acceptance_needs_the_csrf_token(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    issued = invite(factory, seeded.admin)
    visitor = browser_for(None)
    visitor.get(issued.path)
    refused = visitor.client.post(
        issued.path,
        data={"email": "x@example.com", "password": "long enough"},
        headers={"accept": "text/html"},
    )
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert fresh(factory, Invite, issued.invite.id).used_at is None


def test_judgments_count_on_the_staff_tab_is_per_project(
    seeded: Seeded, factory: Factory, browser_for: Browse
) -> None:
    """The seeded rater's judgment in another project does not count here."""
    other = factory.project("elsewhere")
    pair = factory.pair(other)
    factory.session.add(
        Judgment(project_id=other.id, pair_id=pair.id, rater_id=seeded.rater.id, choice="tie")
    )
    factory.session.commit()
    staff(factory, other, seeded.rater)
    members = staffing.members(factory.session, other)
    assert [(m.user.id, m.judgments) for m in members] == [(seeded.rater.id, 1)]
    staff(factory, seeded.project, seeded.rater)
    assert staffing.members(factory.session, seeded.project)[0].judgments == 1


def test_two_acceptances_of_one_invite_at_once_make_one_account(pg_only_url: str) -> None:
    """PostgreSQL, two sessions: the second acceptance waits on the invite's row, then finds
    it used (the claim is one conditional UPDATE)."""
    engine = make_engine(pg_only_url)
    maker = make_sessionmaker(engine)
    try:
        with maker() as setup:
            admin = users.create_user(setup, "boss@example.com", "long enough", "admin")
            secret = users.create_invite(setup, role="rater", actor=admin).secret
            setup.commit()
        first, second = maker(), maker()
        users.accept_invite(first, secret, "one@example.com", "long enough")  # not committed
        outcome: dict[str, str] = {}

        def accept_too() -> None:
            try:
                users.accept_invite(second, secret, "two@example.com", "long enough")
                second.commit()
                outcome["second"] = "accepted"
            except users.InviteGone as exc:
                second.rollback()
                outcome["second"] = exc.reason

        thread = threading.Thread(target=accept_too)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the first acceptance's row lock
        first.commit()
        thread.join(10)
        assert outcome == {"second": "used"}
        first.close()
        second.close()
        with maker() as check:
            emails = set(check.scalars(sa.select(User.email)))
            assert emails == {"boss@example.com", "one@example.com"}
    finally:
        engine.dispose()
