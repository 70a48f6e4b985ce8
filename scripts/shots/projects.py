"""The project list, creating a project, a project's summary and its settings."""

from __future__ import annotations

from typing import Any

from shots import Shot


def _field_error(page: Any) -> None:
    # Submit the new-project form with a slug the server refuses: the error lands at its field.
    page.fill("#f-name", "Tone check")
    page.fill("#f-slug", "tone-check")
    page.fill("#f-overlap", "3")
    page.eval_on_selector("#f-slug", "el => el.removeAttribute('pattern')")
    page.fill("#f-slug", "-bad-")
    page.click("text=Create project")
    page.wait_for_load_state("networkidle")


PAGES = [
    Shot("console-projects", "/admin/projects"),
    Shot("console-project-summary", lambda ids: f"/admin/projects/{ids['slug']}"),
    Shot("console-project-settings", lambda ids: f"/admin/projects/{ids['slug']}/settings"),
    Shot("console-project-new", "/admin/projects/new", before=_field_error),
]
