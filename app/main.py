"""The FastAPI application: API v1, rater and admin pages, static files."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import (
    assignments,
    audit,
    exports,
    health,
    imports,
    leaderboard,
    models,
    moderation,
    projects,
    prompts,
    quality,
    runs,
    snapshots,
    users,
)
from app.api.openapi import declare_errors
from app.core.config import STATIC_DIR, Settings, get_settings
from app.core.db import make_engine, make_sessionmaker
from app.core.logs import setup_logging
from app.core.metrics import RequestMiddleware
from app.services.errors import FieldError, InvalidInput, ServiceError
from app.web import account, auth, console, pages, rate
from app.web.console.common import LoginRequired
from app.web.errors import error_page, wants_html

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


UNSTORABLE = InvalidInput(
    "a value contains a NUL character, which cannot be stored",
    [FieldError(None, None, "contains a NUL character")],
)

TOO_LONG = InvalidInput(
    "a value is longer than its field allows",
    [FieldError(None, None, "longer than the field allows")],
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response that does not set them itself.

    Plain ASGI, not `@app.middleware("http")`: that wraps each request in a task and a response
    stream, a cost every API call paid for four headers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


_gc_frozen = False


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Move everything alive at startup out of the garbage collector's way, once per process.

    A started worker holds hundreds of thousands of long-lived objects (modules, the ORM's
    mappers, compiled statements). Without this, the collector walks them all again in every
    full collection, and under load those came as pauses of up to 0.2 s in a worker's first
    seconds. Once per process: tests start many apps, and frozen garbage is never collected.
    """
    global _gc_frozen
    if not _gc_frozen:
        gc.collect()
        gc.freeze()
        _gc_frozen = True
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    setup_logging(settings.log_format)
    app = FastAPI(
        lifespan=_lifespan,
        title="Verdict",
        version="0.1.0",
        description="Self-hosted RLHF workbench: judgments, reward models, PPO and DPO.",
        docs_url=None,  # served by app.web.pages with vendored Swagger UI (no CDN)
        redoc_url=None,
    )
    engine = make_engine(settings.database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)

    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.resolved_secret_key(),
        session_cookie="verdict_session",
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.cookie_secure,
    )

    app.add_middleware(SecurityHeadersMiddleware)
    # Outermost of ours: the request id is set before anything else runs (and logs), and the
    # latency includes the session middleware.
    app.add_middleware(RequestMiddleware)

    @app.exception_handler(DataError)
    async def unstorable_text(request: Request, exc: DataError) -> Response:
        # The last line of the input rules: a value no route checked (a query parameter with
        # a NUL, a text longer than its column) that PostgreSQL refused. Rolled back.
        reason = str(exc.orig)
        if "NUL" in reason:
            return await service_error(request, UNSTORABLE)
        if "value too long" in reason:
            return await service_error(request, TOO_LONG)
        raise exc

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        if wants_html(request):
            return error_page(request, exc.status_code, exc.message)
        body: dict[str, object] = {"detail": exc.message}
        if isinstance(exc, InvalidInput):
            body["errors"] = [e.as_dict() for e in exc.errors]
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(exc.next_url, status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if wants_html(request):
            return error_page(request, exc.status_code, str(exc.detail))
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if wants_html(request):
            where = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'][1:]) or 'the request'}: {e['msg']}"
                for e in exc.errors()
            )
            return error_page(request, 422, f"This address has a value that does not fit: {where}.")
        errors = [
            {
                "line": None,
                "field": ".".join(str(p) for p in e["loc"][1:]) or None,
                "message": e["msg"],
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)

    api_modules = (
        health, projects, prompts, users, assignments, runs, imports, snapshots, models,
        leaderboard, quality, moderation, exports, audit,
    )  # fmt: skip
    for module in api_modules:
        app.include_router(module.router)
    app.include_router(auth.router)
    app.include_router(console.router)
    app.include_router(account.router)
    app.include_router(pages.router)
    app.include_router(rate.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_run_kind_schemas(app)
    return app


def _add_run_kind_schemas(app: FastAPI) -> None:
    """Put every launchable run kind's config schema into the OpenAPI components, where the
    `POST /projects/{slug}/runs` body (`app.api.runs.CREATE_BODY_DOC`) refers to them, and
    declare the bearer token every API route accepts (so /docs can send one)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(runs.kind_schemas())
            components["securitySchemes"] = {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token: `verdict token create`, or /account/tokens."
                    " Without one, a logged-in browser session works too.",
                }
            }
            schema["security"] = [{"token": []}]
            declare_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
