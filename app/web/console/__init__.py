"""The admin console under /admin (Jinja2 + htmx): admins act, reviewers look, raters get a 403
page. One module per area; each declares its routes with `common.console_route`."""

from __future__ import annotations

from fastapi import APIRouter

from app.web.console import data, models, overview, people, projects, training

router = APIRouter()
for module in (overview, projects, people, data, training, models):
    router.include_router(module.router)
