"""People: the People page (an invite just created, its link shown once), a project's Staff tab,
the own API tokens page (a token just created) and the invite acceptance page."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.models import User, utcnow
from app.services import projects, staffing, users
from shots import Shot


def seed(session: Session, ids: dict[str, Any]) -> None:
    """Staff on the main project, a deactivated rater, pending invites, the admin's tokens."""
    admin = session.get(User, ids["admin"])
    assert admin is not None
    helpful = projects.get_project(session, str(ids["slug"]))
    for email in ("rater1@verdict.local", "rater2@verdict.local"):
        rater = users.get_user_by_email(session, email)
        assert rater is not None
        staffing.add_member(session, helpful, rater, actor_id=admin.id)
    former = users.create_user(session, "former@verdict.local", "screenshot password", "rater")
    former.is_active = False
    former.last_login_at = utcnow() - timedelta(days=40)
    users.create_invite(session, role="reviewer", note="Quality lead, starts Monday", actor=admin)
    users.create_invite(
        session, role="rater", note="Contractor batch 3", project_slug="safety",
        expires_in_days=14, actor=admin,
    )  # fmt: skip
    used = users.create_token(session, admin, "labeling script", scope="rater").token
    used.created_at = utcnow() - timedelta(days=12)
    used.last_used_at = utcnow() - timedelta(minutes=12)
    users.create_token(session, admin, "dashboard (read only)", scope="read", expires_in_days=90)
    users.create_token(
        session, admin, "trial judge", scope="rater", expires_in_days=7,
        now=utcnow() - timedelta(days=9),
    )  # fmt: skip
    old = users.create_token(session, admin, "old laptop").token
    old.revoked_at = utcnow() - timedelta(days=3)
    admin.last_login_at = utcnow()
    ids["invite_path"] = users.create_invite(
        session, role="rater", project_slug=str(ids["slug"]), actor=admin
    ).path


def _create_invite(page: Any) -> None:
    page.select_option("#invite-role", "rater")
    page.select_option("#invite-project", "helpful")
    page.fill("#invite-note", "Grace, night shift")
    page.click("text=Create invite link")
    page.wait_for_selector("#invite-link")


def _create_token(page: Any) -> None:
    page.fill("#token-name", "nightly eval judge")
    page.select_option("#token-scope", "rater")
    page.fill("#token-expiry", "30")
    page.click("button:has-text('Create token')")
    page.wait_for_selector("#token-secret")


def _as_a_visitor(page: Any) -> None:
    """The page as the invitee sees it (not logged in); the admin's cookies come back after,
    for the pages photographed next."""
    cookies = page.context.cookies()
    page.context.clear_cookies()
    page.reload()
    page.wait_for_load_state("networkidle")
    page.context.add_cookies(cookies)


PAGES = [
    Shot("console-people", "/admin/people", before=_create_invite),
    Shot("console-staff", lambda ids: f"/admin/projects/{ids['slug']}/staff"),
    Shot("account-tokens", "/account/tokens", before=_create_token),
    Shot("account-invite", lambda ids: str(ids["invite_path"]), before=_as_a_visitor),
]
