"""The Data tab's Export form: with a snapshot chosen from the list's Export link, and with
a date range refused at its field."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import DatasetSnapshot, Project
from shots import Shot


def seed(session: Session, ids: dict[str, Any]) -> None:
    """The id of the seeded project's snapshot, for the Export link's path."""
    project_id = session.scalar(select(Project.id).where(Project.slug == ids["slug"]))
    ids["snapshot"] = session.scalar(
        select(DatasetSnapshot.id).where(DatasetSnapshot.project_id == project_id).limit(1)
    )


PAGES = [
    Shot(
        "console-data-export",
        lambda ids: f"/admin/projects/{ids['slug']}/export?snapshot={ids['snapshot']}",
    ),
    Shot(
        "console-data-export-errors",
        lambda ids: (
            f"/admin/projects/{ids['slug']}/export?format=raw-csv&since=2026-12-05"
            "&until=2026-12-01&salt=study-7"
        ),
    ),
]
