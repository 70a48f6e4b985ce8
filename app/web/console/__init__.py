"""The admin console under /admin (Jinja2 + htmx): admins act, reviewers look, raters get a 403
page. One module per area; each declares its routes with `common.console_route`."""

from __future__ import annotations

from fastapi import APIRouter

from app.web.console import (
    audit,
    data,
    models,
    moderation,
    overview,
    people,
    projects,
    quality,
    training,
)

router = APIRouter()
for module in (overview, projects, people, data, training, models, quality, moderation, audit):
    router.include_router(module.router)
