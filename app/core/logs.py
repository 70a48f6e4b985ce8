"""Log lines with the request or run they belong to: text (the default) or one JSON object a line.

The ids live in context variables: the web middleware (`app.core.metrics`) sets the request id
for the whole request, including the threadpool that runs sync endpoints (Starlette copies the
context into it); the worker sets the run id around each run task (`workers.celery_app`). The
JSON formatter reads them when it formats a record, which happens synchronously in the code
that logged, so no filter has to be attached to every logger. The run creation service writes
the request id into a new run's log, which joins a run to the request that started it.

Importing this module is cheap and never imports prometheus_client (see `app.core.metrics`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime

REQUEST_ID: ContextVar[str | None] = ContextVar("verdict_request_id", default=None)
RUN_ID: ContextVar[int | None] = ContextVar("verdict_run_id", default=None)

# An incoming X-Request-ID is kept if it is short and plain (a proxy's or a client's id);
# anything else could smuggle a newline or markup into the logs, and is replaced.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# Loggers that own handlers under uvicorn (its default LOGGING_CONFIG) and under Celery.
WEB_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")


def sane_request_id(value: str | None) -> str | None:
    """`value` if it may be used as a request id as it is, else None."""
    if value and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return None


def current_request_id() -> str | None:
    """The id of the HTTP request being served in this context (None outside a request)."""
    return REQUEST_ID.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id (and run_id in a
    worker's run), plus the traceback of an exception as `exc_info`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": REQUEST_ID.get(),
        }
        run_id = RUN_ID.get()
        if run_id is not None:
            entry["run_id"] = run_id
        if record.exc_info:
            entry["exc_info"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def use_json(logger: logging.Logger) -> None:
    """Give every handler of `logger` the JSON formatter."""
    for handler in logger.handlers:
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())


def setup_logging(log_format: str, logger_names: tuple[str, ...] = WEB_LOGGERS) -> None:
    """Apply `log_format` to the handlers of `logger_names` (the root logger is "").

    "text" leaves logging as uvicorn and Celery configure it. "json" switches their handlers to
    `JsonFormatter`, and gives the root logger a stderr handler if it has none, so the app's
    own warnings come out as JSON too instead of through logging's plain last-resort handler.
    Idempotent: tests and `uvicorn --workers` create the app more than once per process.
    """
    if log_format != "json":
        return
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for name in logger_names:
        use_json(logging.getLogger(name))


def uvicorn_log_config() -> dict[str, object]:
    """uvicorn's logging as JSON lines, for `verdict serve` with `log_format=json`: the server's
    own lines (including the parent process of `--workers`, which never creates the app) and
    the access log; the app's loggers at INFO."""
    stream = {"class": "logging.StreamHandler", "formatter": "json"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "default": {**stream, "stream": "ext://sys.stderr"},
            "access": {**stream, "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "app": {"level": "INFO"},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
