"""Console pages: the project list, creating a project, a project's summary and its settings.

The settings form is generated from `ProjectSettings` (app/services/projects.py) with
`forms.fields`, so a new setting appears in it at once; `GROUPS` only orders the fields under
headings, and a setting it does not name lands under "Other" rather than being left out.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from app.api.deps import SessionDep, SettingsDep
from app.kinds.knobs import knob_table
from app.kinds.registry import RUN_KINDS
from app.models import Project, User
from app.services import overview, projects
from app.services.errors import FieldError, InvalidInput
from app.services.projects import LOOP_KINDS, ProjectSettings, project_settings
from app.services.rendering import render_markdown
from app.web.console import forms
from app.web.console.common import Admin, ProjectPage, Reader, console_route, done, page

router = APIRouter(prefix="/admin")

GROUPS: list[tuple[str, str, list[str]]] = [
    ("rating", "Rating", ["overlap", "lease_ttl_s", "aspects", "require_rationale", "gold_rate"]),
    (
        "generation",
        "Generation",
        [
            "base_policy", "responses_per_prompt", "temperature", "top_p", "max_new_tokens",
            "auto_generate", "version_eval_rate", "best_of_k", "pair_selection",
        ],
    ),
    (
        "loop",
        "Closed loop and promotion",
        [
            "auto_mode", "loop_algorithm", "reward_retrain_threshold", "min_reward_accuracy",
            "promote_min_score_gain", "promote_max_kl", "promote_require_lower_bound",
            "heldout_fraction", "heldout_seed",
        ],
    ),
    ("loop-runs", "Runs the loop starts", list(LOOP_KINDS)),
]  # fmt: skip


def settings_groups(
    values: dict[str, Any], errors: list[FieldError] | None = None
) -> list[tuple[str, str, list[forms.FormField]]]:
    """The settings form's fields under their headings, with every setting somewhere."""
    by_name = {
        f.name: f for f in forms.fields(ProjectSettings, values, errors, error_prefix="settings.")
    }
    groups = []
    named: set[str] = set()
    for key, title, names in GROUPS:
        groups.append((key, title, [by_name[n] for n in names if n in by_name]))
        named.update(names)
    rest = [f for name, f in by_name.items() if name not in named]
    if rest:
        groups.append(("other", "Other", rest))
    return groups


def loop_knobs() -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Each loop config's run kind and its knobs, shown beside the JSON inputs."""
    return [
        (setting, kind, knob_table(RUN_KINDS[kind].config)) for setting, kind in LOOP_KINDS.items()
    ]


@console_route(router, "GET", "/projects", access="reader")
def project_list(
    request: Request, session: SessionDep, settings: SettingsDep, user: Reader
) -> Response:
    states = overview.project_states(session, settings)
    return page(request, "console/projects/list.html", user, {"states": states}, section="projects")


@console_route(router, "GET", "/projects/new", access="reader")
def new_project_page(request: Request, user: Reader) -> Response:
    return _new_form(request, user, {}, [])


def _new_form(
    request: Request,
    user: User,
    submitted: dict[str, Any],
    errors: list[FieldError],
    *,
    message: str = "",
    status_code: int = 200,
) -> Response:
    by_field = {e.field: e.message for e in errors if e.field}
    return page(
        request,
        "console/projects/new.html",
        user,
        {
            "submitted": submitted,
            "errors": by_field,
            "message": message,
            "groups": settings_groups(submitted.get("settings", {}), errors),
            "loop_knobs": loop_knobs(),
        },
        section="projects",
        status_code=status_code,
    )


@console_route(router, "POST", "/projects", access="admin")
async def create_project(request: Request, session: SessionDep, user: Admin) -> Response:
    form = await request.form()
    slug, name = str(form.get("slug", "")).strip(), str(form.get("name", "")).strip()
    guidelines = str(form.get("guidelines", ""))
    values = forms.parse(form, ProjectSettings)
    submitted = {"slug": slug, "name": name, "guidelines": guidelines, "settings": values}
    try:
        project = projects.create_project(
            session, slug, name, guidelines=guidelines, settings=values, actor_id=user.id
        )
    except InvalidInput as exc:
        errors = exc.errors or [FieldError(None, _field_of(exc.message), exc.message)]
        return _new_form(request, user, submitted, errors, message=exc.message, status_code=422)
    return done(request, f"/admin/projects/{project.slug}", f"Project {project.name} created.")


def _field_of(message: str) -> str:
    return "slug" if "slug" in message else "name"


@console_route(router, "GET", "/projects/{slug}", access="reader")
def project_summary(
    request: Request, project: ProjectPage, session: SessionDep, settings: SettingsDep, user: Reader
) -> Response:
    state = overview.project_state(session, settings, project)
    return page(
        request, "console/projects/summary.html", user, {"state": state, "tab": "summary"},
        section="project", project=project,
    )  # fmt: skip


@console_route(router, "GET", "/projects/{slug}/settings", access="reader")
def settings_page(request: Request, project: ProjectPage, user: Reader) -> Response:
    return _settings_form(request, user, project, project_settings(project).model_dump(), [])


def _settings_form(
    request: Request,
    user: User,
    project: Project,
    values: dict[str, Any],
    errors: list[FieldError],
    *,
    name: str | None = None,
    guidelines: str | None = None,
    message: str = "",
    status_code: int = 200,
) -> Response:
    text = project.guidelines if guidelines is None else guidelines
    return page(
        request,
        "console/projects/settings.html",
        user,
        {
            "tab": "settings",
            "name": project.name if name is None else name,
            "guidelines": text,
            "preview": render_markdown(text or ""),
            "groups": settings_groups(values, errors),
            "loop_knobs": loop_knobs(),
            "message": message,
        },
        section="project",
        project=project,
        status_code=status_code,
    )


@console_route(router, "POST", "/projects/{slug}/settings", access="admin")
async def save_settings(
    request: Request, project: ProjectPage, session: SessionDep, user: Admin
) -> Response:
    form = await request.form()
    values = forms.parse(form, ProjectSettings)
    name, guidelines = str(form.get("name", project.name)), str(form.get("guidelines", ""))
    try:
        projects.update_project(
            session, project, name=name, guidelines=guidelines, settings=values, actor_id=user.id
        )
    except InvalidInput as exc:
        session.rollback()
        current = {**project_settings(project).model_dump(), **values}
        return _settings_form(
            request, user, project, current, exc.errors, name=name, guidelines=guidelines,
            message=exc.message, status_code=422,
        )  # fmt: skip
    return done(request, f"/admin/projects/{project.slug}/settings", "Settings saved.")


@console_route(router, "POST", "/projects/{slug}/guidelines/preview", access="admin")
async def guidelines_preview(request: Request, project: ProjectPage, user: Admin) -> Response:
    """The guidelines as raters will see them (the rater page's renderer), for the live preview."""
    form: FormData = await request.form()
    html = render_markdown(str(form.get("guidelines", "")))
    return Response(f'<div class="md" hx-disable>{html}</div>', media_type="text/html")
