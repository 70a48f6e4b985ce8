"""Prometheus metrics of the web processes, and the middleware that measures each request.

Two sources make up `/metrics`:

* What a web process sees itself: the request latency histogram, by route *template*
  (`/api/v1/projects/{slug}/prompts`, never the raw path, so the series stay few), method and
  status class. With several uvicorn workers each process writes its samples into files under
  `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode) and the process that
  answers a scrape sums every process's files, so the figures do not depend on which worker
  the scraper reached. `verdict serve` sets that directory (the `metrics_dir` setting) and
  empties it before the workers start. prometheus_client reads the variable when it is first
  imported, so this module is imported only by the web app, never by `app.cli` at start-up.
  Only a histogram lives in those files: counters and histograms of dead processes stay in the
  sums, as they should, and there are no live gauges whose dead files would need
  `multiprocess.mark_process_dead`.
* What the database says at scrape time (`app.services.metrics`): queue depth, runs, worker
  heartbeats, run progress, recent judgments. Those are the same in every process and on every
  host, so they are computed per scrape instead of being counted in one process.

Without the variable (`uvicorn app.main:create_app`, the tests, the demo) the process has its
own in-memory registry, which is right for one process.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logs import REQUEST_ID, sane_request_id

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Fixed when prometheus_client was imported (above): its values are files only if it was set.
MULTIPROCESS = bool(os.environ.get(MULTIPROC_ENV))

REQUEST_SECONDS = Histogram(
    "verdict_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template, method and status class",
    ["route", "method", "status"],
    # The rater calls take a few ms; pages and uploads up to seconds.
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}
REQUEST_ID_HEADER = b"x-request-id"


def route_template(scope: Scope) -> str:
    """The template of the route that served the request, or a fixed stand-in."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path or "/"
    return "unmatched"  # a 404, or a mounted app (static files)


class RequestMiddleware:
    """Gives each request an id (an incoming sane `X-Request-ID`, else a new one) for the logs
    and the response header, and times it into `REQUEST_SECONDS`.

    Plain ASGI (see `app.main.SecurityHeadersMiddleware`): on the rater hot path it adds a
    header, a clock read and one histogram observation, with the labelled child cached.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._children: dict[tuple[str, str, str], object] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        raw_id = request_id.encode()
        token = REQUEST_ID.set(request_id)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, raw_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            self._observe(scope, status, time.perf_counter() - start)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        key = (route_template(scope), method, _STATUS_CLASS.get(status // 100, "other"))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = REQUEST_SECONDS.labels(*key)
        child.observe(seconds)  # type: ignore[attr-defined]


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return sane_request_id(value.decode("latin-1"))
    return None


class _Families(Collector):
    """Already computed metric families (the database's), handed to a registry."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class _Forward(Collector):
    """The process's default registry (its own histogram, process and GC figures)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def render(database_families: Iterable[Metric]) -> tuple[bytes, str]:
    """The text exposition of every web process's metrics plus `database_families`."""
    registry = CollectorRegistry(auto_describe=False)
    if MULTIPROCESS:
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward())
    registry.register(_Families(database_families))
    return generate_latest(registry), CONTENT_TYPE_LATEST
