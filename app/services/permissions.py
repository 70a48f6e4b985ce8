"""Who may do what: one small function per action, tested as a route x role matrix."""

from __future__ import annotations

from app.models import User


def is_admin(user: User) -> bool:
    return user.is_active and user.role == "admin"


def can_manage_projects(user: User) -> bool:
    return is_admin(user)


def can_view_project(user: User) -> bool:
    return user.is_active


def can_upload_data(user: User) -> bool:
    return is_admin(user)


def can_read_data(user: User) -> bool:
    """Prompts, responses, judgments of others: admins and reviewers."""
    return user.is_active and user.role in ("admin", "reviewer")


def can_rate(user: User) -> bool:
    """Rating at all; which projects a rater may rate is their staffing (`services/staffing.py`)."""
    return user.is_active


def rates_unstaffed(user: User) -> bool:
    """Admins and reviewers rate every project, also one staffed without them; raters only the
    open projects and those they are staffed on."""
    return user.is_active and user.role in ("admin", "reviewer")


def can_manage_runs(user: User) -> bool:
    return is_admin(user)


def can_manage_users(user: User) -> bool:
    return is_admin(user)
