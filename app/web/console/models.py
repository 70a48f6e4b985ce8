"""Console pages of the Models tab: a project's policy and reward versions with the human
leaderboard, a version page (metrics, lineage, sample answers, promote and roll back), and the
playground, where a policy answers a prompt and a reward model scores two answers.

    /admin/projects/{slug}/models           versions + leaderboard (chart drawn here, as SVG)
    /admin/models/{version_id}              one version; POST .../promote, .../rollback
    /admin/projects/{slug}/playground       POST .../generate, .../score queue a short run
    /admin/runs/{run_id}/answer             the fragment htmx polls until that run has ended

The playground never waits for a model: its POST queues a `sample` or `score` run and answers
with a fragment that follows the run, one query a second, until a worker has answered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, Request
from markupsafe import Markup
from starlette.datastructures import FormData
from starlette.responses import Response

from app.api.deps import SessionDep, SettingsDep
from app.kinds.interactive import SampleRequest
from app.models import ModelVersion, Project, Run, User
from app.services import interactive, leaderboard, loop, promotion, registry, runs
from app.services.errors import FieldError, InvalidInput, ServiceError
from app.services.rendering import render_markdown
from app.web.console import forms
from app.web.console.common import (
    Admin,
    ProjectPage,
    Reader,
    console_route,
    done,
    flash,
    htmx,
    metric_text,
    page,
)

router = APIRouter(prefix="/admin")

MAX_REASON = 2000  # as the API's PromoteIn
# The prompt and messages of a SampleRequest are the prompt textarea, not generated knobs.
PROMPT_FIELDS = frozenset({"prompt", "messages"})
# The versions the playground offers: those with weights to answer or score with.
USABLE = ("candidate", "active", "archived")


async def _form(request: Request) -> FormData:
    return await request.form()


FormDep = Annotated[FormData, Depends(_form)]


# --- the versions page ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChartRow:
    """One version's row of the leaderboard chart, in viewBox units."""

    label: str
    title: str
    y: float
    x_low: float
    x_high: float
    x_rating: float
    active: bool


@dataclass(frozen=True)
class Chart:
    """The leaderboard's ratings with their 95 % intervals, laid out for an inline SVG."""

    width: int
    height: int
    plot_left: int
    plot_right: int
    axis_y: float
    rows: list[ChartRow]
    ticks: list[tuple[float, str]]
    reference_x: float


CHART_WIDTH, LABEL_WIDTH, ROW_HEIGHT, TOP, AXIS_HEIGHT, RIGHT_PAD = 400, 52, 26, 10, 34, 18


def _tick_step(span: float) -> float:
    """A round tick spacing giving three to six ticks over `span` rating points."""
    for step in (5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000):
        if span / step <= 5:
            return float(step)
    return 10 ** math.ceil(math.log10(span))


def leaderboard_chart(standings: list[dict[str, Any]]) -> Chart | None:
    """The chart of `standings` (best first): a row per version with its rating as a dot and
    its interval as a whisker, an axis of ratings, and the 1000 line (the average version)."""
    if not standings:
        return None
    low = min(min(s["ci_low"], s["rating"]) for s in standings)
    high = max(max(s["ci_high"], s["rating"]) for s in standings)
    low, high = min(low, leaderboard.BASE_RATING), max(high, leaderboard.BASE_RATING)
    pad = max((high - low) * 0.06, 5.0)
    low, high = low - pad, high + pad
    step = _tick_step(high - low)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    left, right = LABEL_WIDTH, CHART_WIDTH - RIGHT_PAD

    def x(rating: float) -> float:
        return round(left + (rating - low) / (high - low) * (right - left), 1)

    rows = [
        ChartRow(
            label=f"v{s['version']}" if s["version"] >= 0 else str(s["version_id"]),
            title=(
                f"v{s['version']} {s['name']}: {s['rating']:.0f}"
                f" (95 % interval {s['ci_low']:.0f}–{s['ci_high']:.0f}), {s['games']} games"
            ),
            y=TOP + ROW_HEIGHT * i + ROW_HEIGHT / 2,
            x_low=x(s["ci_low"]),
            x_high=x(s["ci_high"]),
            x_rating=x(s["rating"]),
            active=s["status"] == "active",
        )
        for i, s in enumerate(standings)
    ]
    axis_y = TOP + ROW_HEIGHT * len(rows) + 4
    count = round((high - low) / step)
    ticks = [(x(low + step * k), f"{low + step * k:.0f}") for k in range(count + 1)]
    return Chart(
        width=CHART_WIDTH, height=int(axis_y + AXIS_HEIGHT), plot_left=left, plot_right=right,
        axis_y=axis_y, rows=rows, ticks=ticks, reference_x=x(leaderboard.BASE_RATING),
    )  # fmt: skip


@console_route(router, "GET", "/projects/{slug}/models", access="reader")
def versions_page(
    request: Request, session: SessionDep, settings: SettingsDep, project: ProjectPage, user: Reader
) -> Response:
    registry.ensure_base_policy(session, project, settings)
    summaries = registry.version_summaries(session, project)
    board = leaderboard.project_leaderboard(session, project)
    return page(
        request, "console/models/versions.html", user,
        {
            "tab": "models",
            "policies": [v for v in summaries if v.kind == "policy"],
            "rewards": [v for v in summaries if v.kind == "reward"],
            "board": board,
            "chart": leaderboard_chart(board["versions"]),
        },
        section="project", project=project,
    )  # fmt: skip


# --- a version page -------------------------------------------------------------------------


# The nested groups of a policy's metrics, in the order the page shows them (others follow).
SECTION_TITLES = {
    "train": "Training metrics (last step)",
    "evaluation": "Evaluation on held-out prompts",
    "heldout": "Held-out split",
}


def metric_sections(metrics: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """A version's metrics as titled key/value lists: its top-level figures, then each nested
    group (training metrics, evaluation figures, the held-out split, ...). The evaluation's
    samples are shown side by side elsewhere; the promotion rule has its own line."""
    top = [(k, metric_text(k, v)) for k, v in metrics.items() if not isinstance(v, dict)]
    sections = [("Figures", top)] if top else []
    order = list(SECTION_TITLES)
    groups = sorted(metrics, key=lambda k: order.index(k) if k in order else len(order))
    for key in groups:
        value = metrics[key]
        if not isinstance(value, dict) or key == "promotion_rule":
            continue
        items = sorted(value.items()) if key == "train" else list(value.items())
        rows = [(k, metric_text(k, v)) for k, v in items if k != "samples"]
        if rows:
            sections.append((SECTION_TITLES.get(key, key.replace("_", " ")), rows))
    return sections


@dataclass(frozen=True)
class Sample:
    """One evaluation prompt with the candidate's and the parent's answers, rendered."""

    prompt: Markup
    response: Markup
    score: float | None
    parent_response: Markup
    parent_score: float | None


def samples_of(metrics: dict[str, Any]) -> list[Sample]:
    """The evaluation's sample answers, markdown rendered (untrusted model output)."""
    evaluation = metrics.get("evaluation")
    rows = evaluation.get("samples") if isinstance(evaluation, dict) else None
    out = []
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        out.append(
            Sample(
                prompt=render_markdown(str(row.get("prompt", ""))),
                response=render_markdown(str(row.get("response", ""))),
                score=_number(row.get("score")),
                parent_response=render_markdown(str(row.get("parent_response", ""))),
                parent_score=_number(row.get("parent_score")),
            )
        )
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _version_page(
    request: Request,
    session: SessionDep,
    user: User,
    version: ModelVersion,
    *,
    reason: str = "",
    generate: bool = True,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    project = session.get(Project, version.project_id)
    assert project is not None
    metrics = version.metrics or {}
    rule = metrics.get("promotion_rule")
    return page(
        request, "console/models/version.html", user,
        {
            "tab": "models",
            "v": version,
            "lineage": promotion.version_lineage(session, version),
            "sections": metric_sections(metrics),
            "samples": samples_of(metrics),
            "rule": rule if isinstance(rule, dict) else None,
            "reason": reason,
            "generate": generate,
            "errors": errors or {},
        },
        section="project", project=project, status_code=status_code,
    )  # fmt: skip


@console_route(router, "GET", "/models/{version_id}", access="reader")
def version_page(request: Request, version_id: int, session: SessionDep, user: Reader) -> Response:
    return _version_page(request, session, user, registry.get_version(session, version_id))


def _change(
    action: Literal["promote", "rollback"],
    request: Request,
    version_id: int,
    session: SessionDep,
    settings: SettingsDep,
    user: User,
    reason: str,
    generate: str | None,
) -> Response:
    version = registry.get_version(session, version_id)
    reason = reason.strip()
    queue = generate is not None
    if not reason or len(reason) > MAX_REASON:
        problem = "give a reason: it is kept in the audit log"
        if reason:
            problem = f"at most {MAX_REASON} characters"
        return _version_page(
            request, session, user, version, reason=reason, generate=queue,
            errors={"reason": problem}, status_code=422,
        )  # fmt: skip
    previous = promotion.active_version(session, version.project_id, version.kind)
    change = promotion.promote if action == "promote" else promotion.rollback
    try:
        change(session, version, actor_id=user.id, reason=reason)
    except ServiceError as exc:  # already active, no weights, not earlier: say so on the page
        flash(request, f"Not changed: {exc.message}.", bad=True)
        return _version_page(
            request, session, user, version, reason=reason, generate=queue,
            status_code=exc.status_code,
        )  # fmt: skip
    message = f"{version.kind.capitalize()} v{version.version} is active now"
    if previous is not None:
        message += f"; v{previous.version} is archived"
    if queue and version.kind == "policy":
        project = session.get(Project, version.project_id)
        assert project is not None
        run = loop.after_promotion(session, project, version, settings=settings)
        message += (
            f"; generation run {run.id} queued" if run else "; no generation run could be queued"
        )
    return done(request, f"/admin/models/{version.id}", message + ".")


@console_route(router, "POST", "/models/{version_id}/promote", access="admin")
def promote(
    request: Request,
    version_id: int,
    session: SessionDep,
    settings: SettingsDep,
    user: Admin,
    reason: Annotated[str, Form()] = "",
    generate: Annotated[str | None, Form()] = None,
) -> Response:
    return _change("promote", request, version_id, session, settings, user, reason, generate)


@console_route(router, "POST", "/models/{version_id}/rollback", access="admin")
def rollback(
    request: Request,
    version_id: int,
    session: SessionDep,
    settings: SettingsDep,
    user: Admin,
    reason: Annotated[str, Form()] = "",
    generate: Annotated[str | None, Form()] = None,
) -> Response:
    return _change("rollback", request, version_id, session, settings, user, reason, generate)


# --- the playground -------------------------------------------------------------------------


@dataclass
class PlaygroundForm:
    """What one of the playground's forms shows: its values, its errors, the run it follows."""

    values: dict[str, Any]
    errors: dict[str, str]
    fields: list[forms.FormField]
    error: str = ""  # a refusal that is no field's (a version without weights)
    answer: interactive.Answer | None = None


def _field_errors(errors: list[FieldError]) -> dict[str, str]:
    """Service errors (`config.model_version_id`, `config` for the prompt) by form field."""
    out: dict[str, str] = {}
    for e in errors:
        name = (e.field or "").removeprefix("config").lstrip(".")
        key = {"": "prompt", "messages": "prompt", "model_version_id": "version"}.get(
            name.split(".")[0], name.split(".")[0]
        )
        out.setdefault(key, e.message.removeprefix("Value error, "))
    return out


def _generate_form(
    values: dict[str, Any] | None = None, errors: list[FieldError] | None = None, **kw: Any
) -> PlaygroundForm:
    values = values or {}
    return PlaygroundForm(
        values=values,
        errors=_field_errors(errors or []),
        fields=forms.fields(SampleRequest, values, errors, skip=PROMPT_FIELDS),
        **kw,
    )


def _score_form(
    values: dict[str, Any] | None = None, errors: list[FieldError] | None = None, **kw: Any
) -> PlaygroundForm:
    return PlaygroundForm(values=values or {}, errors=_field_errors(errors or []), fields=[], **kw)


def _playground(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: Project,
    user: User,
    *,
    generate: PlaygroundForm | None = None,
    score: PlaygroundForm | None = None,
    only: str | None = None,
    status_code: int = 200,
) -> Response:
    registry.ensure_base_policy(session, project, settings)
    versions = [v for v in registry.version_summaries(session, project) if v.status in USABLE]
    context = {
        "tab": "models",
        "policies": [v for v in versions if v.kind == "policy"],
        "rewards": [v for v in versions if v.kind == "reward"],
        "gen": generate or _generate_form(),
        "sc": score or _score_form(),
        "markdown": render_markdown,
    }
    if only is not None:  # htmx: the card of the form that was sent
        template = f"console/models/_{only}_card.html"
    else:
        template = "console/models/playground.html"
    return page(
        request, template, user, context, section="project", project=project,
        status_code=status_code,
    )  # fmt: skip


@console_route(router, "GET", "/projects/{slug}/playground", access="reader")
def playground_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectPage,
    user: Reader,
    generate: int | None = None,
    score: int | None = None,
) -> Response:
    """The playground; `?generate=<run id>` or `?score=<run id>` follows that run in its form,
    filled from the run's config (where a form sent without JavaScript comes back to)."""
    return _playground(
        request, session, settings, project, user,
        generate=_card_of_run(session, project, "sample", generate),
        score=_card_of_run(session, project, "score", score),
    )  # fmt: skip


def _card_of_run(
    session: SessionDep, project: Project, kind: str, run_id: int | None
) -> PlaygroundForm | None:
    if run_id is None:
        return None
    run = session.get(Run, run_id)
    if run is None or run.project_id != project.id or run.kind != kind:
        return None
    config = dict(run.config or {})
    values: dict[str, Any] = {**config, "version_id": config.get("model_version_id")}
    answer = interactive.answer_of(run)
    if kind == "sample":
        values["prompt"] = config.get("prompt") or (answer.messages or [{}])[-1].get("content", "")
        return _generate_form(values, answer=answer)
    responses = [*list(config.get("responses") or []), "", ""]
    values.update(response_a=responses[0], response_b=responses[1])
    return _score_form(values, answer=answer)


def _version_id(form: FormData) -> int | None:
    raw = str(form.get("version_id", "")).strip()
    return int(raw) if raw.isdigit() else None


def _queue(
    kind: Literal["sample", "score"],
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: Project,
    user: User,
    form: FormData,
) -> Response:
    only = "generate" if kind == "sample" else "score"
    version_id = _version_id(form)
    prompt = str(form.get("prompt", ""))
    missing: list[FieldError] = []
    if kind == "sample":
        body = {**forms.parse(form, SampleRequest), "prompt": prompt}
        body.pop("messages", None)
        values = {**body, "version_id": version_id}
        build = _generate_form
    else:
        answers = {side: str(form.get(side, "")) for side in ("response_a", "response_b")}
        body = {"prompt": prompt, "responses": list(answers.values())}
        values = {"prompt": prompt, **answers, "version_id": version_id}
        build = _score_form
        missing = [
            FieldError(None, side, "write an answer to score")
            for side, text in answers.items()
            if not text.strip()
        ]
    try:
        if missing:
            raise InvalidInput("both answers are needed", missing)
        run = interactive.queue_run(
            session, project, kind, version_id, body, settings=settings, actor_id=user.id
        )
    except InvalidInput as exc:
        card = build(values, exc.errors or [FieldError(None, "config", exc.message)])
        return _respond(request, session, settings, project, user, only, card, 422)
    except ServiceError as exc:  # a version without usable weights
        card = build(values, error=exc.message)
        return _respond(request, session, settings, project, user, only, card, exc.status_code)
    if not htmx(request):
        # Without JavaScript: back to the playground, which follows the run from its config.
        return done(
            request, f"/admin/projects/{project.slug}/playground?{only}={run.id}",
            f"{run.kind.capitalize()} run {run.id} queued.",
        )  # fmt: skip
    card = build(values, answer=interactive.answer_of(run))
    return _respond(request, session, settings, project, user, only, card, 200)


def _respond(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: Project,
    user: User,
    only: str,
    card: PlaygroundForm,
    status_code: int,
) -> Response:
    cards = {"generate": card} if only == "generate" else {"score": card}
    return _playground(
        request, session, settings, project, user, **cards,
        only=only if htmx(request) else None, status_code=status_code,
    )  # fmt: skip


@console_route(router, "POST", "/projects/{slug}/playground/generate", access="admin")
def playground_generate(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectPage,
    user: Admin,
    form: FormDep,
) -> Response:
    return _queue("sample", request, session, settings, project, user, form)


@console_route(router, "POST", "/projects/{slug}/playground/score", access="admin")
def playground_score(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectPage,
    user: Admin,
    form: FormDep,
) -> Response:
    return _queue("score", request, session, settings, project, user, form)


@console_route(router, "GET", "/runs/{run_id}/answer", access="reader")
def run_answer(request: Request, run_id: int, session: SessionDep, user: Reader) -> Response:
    """The fragment that follows an interactive run: it asks again every second (htmx) until
    the run has ended, then shows the answers, the scores, or the run's error."""
    answer = interactive.answer_of(runs.get_run(session, run_id))
    return page(
        request, "console/models/_answer.html", user,
        {"answer": answer, "markdown": render_markdown},
    )  # fmt: skip
