"""Console pages: a project's runs, launching one, and a run's own page.

    GET  /admin/projects/{slug}/training             the runs, newest first; the launch menu
    GET  /admin/projects/{slug}/training/new/{kind}  a launch form generated from the kind's config
    POST /admin/projects/{slug}/training/new/{kind}  queue it (`runs.create_run`), go to its page
    GET  /admin/runs/{run_id}                        status, progress, log, charts, samples, lineage
    GET  /admin/runs/{run_id}/live                   the part that changes, polled by htmx
    GET  /admin/runs/{run_id}/metrics.json           every metric, for the charts
    POST /admin/runs/{run_id}/cancel | /retry        `runs.cancel_run` | `runs.retry_run`

The launch form comes from the same knob class the service validates against (`forms.fields`),
so a new knob appears in it at once and a bad value comes back at its field. The run page's
live region asks for its fragment every 1.5 s while the run is queued or running; the fragment
of an ended run carries no trigger, so the polling stops by itself, and it brings the result and
lineage along (out of band) so the page is complete without a reload. The charts
(static/js/console-training.js, uPlot) redraw from metrics.json every 2 s while the run lives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.api.deps import SessionDep, SettingsDep
from app.kinds.knobs import Knobs
from app.kinds.registry import LAUNCHABLE_KINDS, RUN_KINDS, RunKind
from app.models import Project, Run, User, utcnow
from app.models.training import RUN_STATUSES
from app.services import permissions, runs
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound
from app.web.console import forms
from app.web.console.common import (
    Admin,
    ProjectPage,
    Reader,
    console_route,
    done,
    flash,
    metric_text,
    page,
    plain,
)
from app.web.templating import render

router = APIRouter(prefix="/admin")


# --- formatting -------------------------------------------------------------------------------


def first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def shown(value: Any) -> str:
    """A config or result value as one line: JSON for lists and objects, else as written."""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "—"
    return str(value)


MODEL_KEYS = frozenset({"model_version_id", "reward_model_id", "parent_id"})


def link_for(key: str, value: Any) -> str:
    """The console page of a row a config or result names by id (a model version, a run)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return ""
    if key in MODEL_KEYS:
        return f"/admin/models/{value}"
    if key.endswith("_run_id"):
        return f"/admin/runs/{value}"
    return ""


def result_rows(result: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A run's result as (key, value) rows; a nested object opens into dotted keys
    (`metrics.train.loss/policy`) instead of one line of JSON."""
    rows: list[tuple[str, Any]] = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(result_rows(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def measured(value: Any, key: str = "") -> str:
    """A result value: numbers the way the model pages write them, a 95 % interval (a key
    ending `_ci95`) as its two ends, the rest as `shown`."""
    if key.endswith("_ci95"):
        return metric_text(key, value)
    return plain(value) if isinstance(value, float) else shown(value)


# --- the runs list ----------------------------------------------------------------------------


def _started_by(run: Run) -> str:
    if run.parent_run_id is not None:
        return f"run #{run.parent_run_id}"
    return {"auto": "the loop", "upload": "an upload"}.get(run.trigger, run.trigger)


@dataclass
class RunRow:
    run: Run
    started_by: str  # who or what: an email, "run #12", or the trigger

    @property
    def duration(self) -> str:
        return runs.format_duration(runs.elapsed_seconds(self.run))

    @property
    def error_line(self) -> str:
        return first_line(self.run.error)


def _choice(value: str | None, accepted: tuple[str, ...], what: str) -> str | None:
    if not value:
        return None
    if value not in accepted:
        raise InvalidInput(
            f"unknown {what} {value!r}; use one of {', '.join(accepted)}",
            [FieldError(None, what, f"unknown {what}")],
        )
    return value


@console_route(router, "GET", "/projects/{slug}/training", access="reader")
def runs_page(
    request: Request,
    session: SessionDep,
    user: Reader,
    project: ProjectPage,
    kind: str | None = None,
    status: str | None = None,
    before: int | None = None,
    after: int | None = None,
) -> Response:
    kind = _choice(kind, tuple(RUN_KINDS), "kind")
    status = _choice(status, RUN_STATUSES, "status")
    found, newer, older = runs.runs_page(
        session, project, kind=kind, status=status, before=before, after=after
    )
    rows = [RunRow(run, email or _started_by(run)) for run, email in found]
    filters = {k: v for k, v in (("kind", kind), ("status", status)) if v}
    return page(
        request,
        "console/training/runs.html",
        user,
        {
            "tab": "training",
            "rows": rows,
            "newer": newer,
            "older": older,
            "filters": filters,
            "kinds": list(RUN_KINDS.values()),
            "statuses": RUN_STATUSES,
            "launchable": [RUN_KINDS[k] for k in LAUNCHABLE_KINDS],
        },
        section="project",
        project=project,
    )


# --- launching --------------------------------------------------------------------------------


@dataclass
class FormGroup:
    """A fieldset of the launch form: its id, legend, one-line explanation and fields."""

    key: str
    title: str
    note: str
    fields: list[forms.FormField]


def _nested(config: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The config's fields that are knob classes of their own (a reward run's `data`)."""
    out = {}
    for name, info in config.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out[name] = annotation
    return out


def _trainer_knobs(config: type[BaseModel]) -> frozenset[str]:
    """The knobs the config shares with its algorithm's knob class (`RewardKnobs` for a reward
    run); the rest of its fields say what the run trains on."""
    for base in config.__mro__[1:]:
        if isinstance(base, type) and issubclass(base, Knobs) and base is not Knobs:
            return frozenset(base.model_fields)
    return frozenset()


def launch_groups(
    kind: RunKind, values: dict[str, Any], errors: list[FieldError] | None = None
) -> list[FormGroup]:
    """The launch form of `kind`: what the run trains on, its nested configs, then its knobs."""
    config = kind.config
    nested = _nested(config)
    every = forms.fields(config, values, errors, skip=frozenset(nested))
    trainer = _trainer_knobs(config)
    inputs = [f for f in every if f.name not in trainer]
    knobs = [f for f in every if f.name in trainer]
    split = bool(inputs and knobs)  # a kind without a trainer's knob class is one group
    groups = []
    if split:
        groups.append(FormGroup("inputs", "What it runs on", "", inputs))
    for name, model in nested.items():
        description = config.model_fields[name].description or ""
        sub = values.get(name) if isinstance(values.get(name), dict) else {}
        groups.append(
            FormGroup(
                name,
                name.replace("_", " ").capitalize(),
                description,
                forms.fields(model, sub, errors, prefix=f"{name}."),
            )
        )
    groups.append(FormGroup("knobs", "Knobs", "", knobs if split else every))
    return groups


def _launchable(name: str) -> RunKind:
    if name not in LAUNCHABLE_KINDS:
        raise NotFound(f"there is no run kind {name!r} to launch; use one of {LAUNCHABLE_KINDS}")
    return RUN_KINDS[name]


def _launch_page(
    request: Request,
    user: User,
    project: Project,
    kind: RunKind,
    values: dict[str, Any],
    error: InvalidInput | None = None,
) -> Response:
    errors = error.errors if error else []
    groups = launch_groups(kind, values, errors)
    named = {f.name for g in groups for f in g.fields}
    # Errors that belong to no one field (a rule across knobs): listed above the form.
    loose = [e for e in errors if (e.field or "").removeprefix("config.") not in named]
    return page(
        request,
        "console/training/launch.html",
        user,
        {
            "tab": "training",
            "kind": kind,
            "groups": groups,
            "error": error,
            "loose_errors": loose,
        },
        section="project",
        project=project,
        status_code=422 if error else 200,
    )


@console_route(router, "GET", "/projects/{slug}/training/new/{kind}", access="reader")
def launch_form(request: Request, user: Reader, project: ProjectPage, kind: str) -> Response:
    return _launch_page(request, user, project, _launchable(kind), {})


@console_route(router, "POST", "/projects/{slug}/training/new/{kind}", access="admin")
async def launch(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: Admin,
    project: ProjectPage,
    kind: str,
) -> Response:
    spec = _launchable(kind)
    form = await request.form()
    config = forms.parse(form, spec.config)
    for name, model in _nested(spec.config).items():
        sub = forms.parse(form, model, prefix=f"{name}.")
        if sub:
            config[name] = sub
    try:
        run = runs.create_run(
            session, project, spec.name, config, settings=settings, actor_id=user.id,
            trigger="console", launchable_only=True,
        )  # fmt: skip
    except InvalidInput as exc:
        return _launch_page(request, user, project, spec, config, exc)
    return done(request, f"/admin/runs/{run.id}", f"Run {run.id} ({spec.title}) queued.")


# --- a run's page -----------------------------------------------------------------------------


def _samples(run: Run) -> tuple[list[tuple[str, list[dict[str, Any]]]], list[dict[str, Any]]]:
    """The sample tables of the run's result: PPO's by step (newest first), and an
    evaluation's list with both models' answers."""
    samples = (run.result or {}).get("samples")
    by_step: list[tuple[str, list[dict[str, Any]]]] = []
    compared: list[dict[str, Any]] = []
    if isinstance(samples, dict):
        steps = sorted(samples, key=lambda s: int(s) if str(s).isdigit() else -1, reverse=True)
        by_step = [(str(s), [r for r in samples[s] if isinstance(r, dict)]) for s in steps]
    elif isinstance(samples, list):
        compared = [r for r in samples if isinstance(r, dict)]
    return by_step, compared


def _run_context(session: Session, run: Run, *, with_details: bool) -> dict[str, Any]:
    """What the run page and its live fragment show; `with_details` adds the result, samples
    and lineage (the page, and the fragment of an ended run)."""
    now = utcnow()
    creator = session.get(User, run.created_by_id) if run.created_by_id is not None else None
    ctx: dict[str, Any] = {
        "run": run,
        "kind": RUN_KINDS.get(run.kind),
        "active": run.status in runs.ACTIVE_STATUSES,
        "elapsed": runs.format_duration(runs.elapsed_seconds(run, now)),
        "eta": runs.format_duration(runs.eta_seconds(run, now)),
        "created_by": creator.email if creator is not None else _started_by(run),
        "percent": (
            round(100 * run.progress_done / run.progress_total) if run.progress_total else None
        ),
        "retryable": run.kind in LAUNCHABLE_KINDS,
        "shown": shown,
        "link_for": link_for,
        "measured": measured,
    }
    if with_details:
        by_step, compared = _samples(run)
        ctx.update(
            lineage=runs.run_lineage(session, run),
            result=result_rows({k: v for k, v in (run.result or {}).items() if k != "samples"}),
            samples_by_step=by_step,
            samples_compared=compared,
        )
    return ctx


def _run_and_project(session: Session, run_id: int) -> tuple[Run, Project]:
    run = runs.get_run(session, run_id)
    project = session.get(Project, run.project_id)
    if project is None:  # the foreign key cascades; only a race gets here
        raise NotFound(f"run {run_id} not found")
    return run, project


@console_route(router, "GET", "/runs/{run_id}", access="reader")
def run_page(request: Request, session: SessionDep, user: Reader, run_id: int) -> Response:
    run, project = _run_and_project(session, run_id)
    ctx = _run_context(session, run, with_details=True)
    return page(
        request,
        "console/training/run.html",
        user,
        {"tab": "training", **ctx},
        section="project",
        project=project,
    )


@console_route(router, "GET", "/runs/{run_id}/live", access="reader")
def run_live(request: Request, session: SessionDep, user: Reader, run_id: int) -> Response:
    """The live region of the run page. `render`, not `page`: a poll must not take the flash
    messages meant for the next page."""
    run, _project = _run_and_project(session, run_id)
    ended = run.status not in runs.ACTIVE_STATUSES
    ctx = _run_context(session, run, with_details=ended)
    return render(
        request,
        "console/training/live.html",
        {"user": user, "can_act": permissions.is_admin(user), **ctx, "oob": ended},
    )


@console_route(router, "GET", "/runs/{run_id}/metrics.json", access="reader")
def run_metrics(session: SessionDep, user: Reader, run_id: int) -> JSONResponse:
    """`{"name": [[step, value], ...]}`; a NaN or infinite value (a diverged loss) is null,
    which JSON can carry and the chart leaves as a gap."""
    run = runs.get_run(session, run_id)
    series = runs.run_metrics(session, run)
    body = {
        name: [[step, value if math.isfinite(value) else None] for step, value in points]
        for name, points in series.items()
    }
    return JSONResponse(body, headers={"cache-control": "no-store"})


# --- cancel and retry -------------------------------------------------------------------------


@console_route(router, "POST", "/runs/{run_id}/cancel", access="admin")
def cancel(
    request: Request, session: SessionDep, settings: SettingsDep, user: Admin, run_id: int
) -> Response:
    run = runs.get_run(session, run_id)
    try:
        run = runs.cancel_run(session, run, settings=settings, actor_id=user.id)
    except Conflict as exc:
        # It ended meanwhile: say so on its page, which shows how it ended.
        flash(request, exc.message, bad=True)
        return done_quietly(f"/admin/runs/{run_id}")
    message = "cancelled" if run.status == "cancelled" else "stopping at its next step"
    return done(request, f"/admin/runs/{run.id}", f"Run {run.id}: {message}.")


@console_route(router, "POST", "/runs/{run_id}/retry", access="admin")
def retry(
    request: Request, session: SessionDep, settings: SettingsDep, user: Admin, run_id: int
) -> Response:
    run = runs.get_run(session, run_id)
    try:
        again = runs.retry_run(session, run, settings=settings, actor_id=user.id)
    except (Conflict, InvalidInput) as exc:
        detail = "; ".join(f"{e.field}: {e.message}" for e in getattr(exc, "errors", []))
        flash(request, exc.message + (f" ({detail})" if detail else ""), bad=True)
        return done_quietly(f"/admin/runs/{run_id}")
    return done(
        request, f"/admin/runs/{again.id}", f"Run {again.id} queued: a retry of run {run.id}."
    )


def done_quietly(url: str) -> Response:
    """A 303 to `url` without a success message (the flash already says what went wrong)."""
    return RedirectResponse(url, status_code=303)
