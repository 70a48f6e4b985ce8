"""Logs: the JSON line format, which request ids are kept, and the request id that a run
created by an HTTP request carries in its log. (JSON lines from a real `verdict serve` are
checked in tests/api/test_metrics.py, from a real worker in tests/workers/test_presence.py.)"""

from __future__ import annotations

import json
import logging
import sys

from fastapi.testclient import TestClient

from app.core.logs import REQUEST_ID, RUN_ID, JsonFormatter, sane_request_id, setup_logging
from app.models import Run
from tests.conftest import Factory, bearer


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("app.test", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_json_line_has_time_level_logger_message_and_the_ids() -> None:
    formatter = JsonFormatter()
    plain = json.loads(formatter.format(_record("%d pairs", 3)))
    assert plain["message"] == "3 pairs" and plain["level"] == "WARNING"
    assert plain["logger"] == "app.test" and plain["request_id"] is None
    assert "run_id" not in plain and plain["time"].endswith("+00:00")
    request, run = REQUEST_ID.set("req-1"), RUN_ID.set(7)
    try:
        line = formatter.format(_record('quote " and\nnewline', exc=True))
    finally:
        REQUEST_ID.reset(request)
        RUN_ID.reset(run)
    assert "\n" not in line  # one line per record, whatever the message holds
    entry = json.loads(line)
    assert entry["request_id"] == "req-1" and entry["run_id"] == 7
    assert entry["message"] == 'quote " and\nnewline'
    assert "ValueError: boom" in entry["exc_info"]


def test_sane_request_ids() -> None:
    for good in ("abc", "0af7651916cd43dd8448eb211c80319c", "lb:1.2/x=y+z@host-9"):
        assert sane_request_id(good) == good
    for bad in (None, "", "a b", "x" * 129, "<script>", "line\nbreak", "é"):
        assert sane_request_id(bad) is None


def test_text_leaves_logging_alone_and_json_is_idempotent() -> None:
    logger = logging.getLogger("verdict-test-json")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        setup_logging("text", ("verdict-test-json",))
        assert not isinstance(handler.formatter, JsonFormatter)
        setup_logging("json", ("verdict-test-json",))
        formatter = handler.formatter
        assert isinstance(formatter, JsonFormatter)
        setup_logging("json", ("verdict-test-json",))
        assert handler.formatter is formatter and logger.handlers == [handler]
    finally:
        logger.removeHandler(handler)


def test_a_run_created_by_a_request_names_it_in_its_log(
    client: TestClient, factory: Factory
) -> None:
    project = factory.project("logged", base_policy="/models/base")
    admin = bearer(factory.token(factory.user("admin")))
    response = client.post(
        f"/api/v1/projects/{project.slug}/runs",
        json={"kind": "generate", "config": {"limit": 1}},
        headers={**admin, "X-Request-ID": "req-from-ci-42"},
    )
    assert response.status_code == 201, response.text
    assert response.headers["x-request-id"] == "req-from-ci-42"
    run = factory.session.get(Run, response.json()["id"])
    assert run is not None
    first = run.log_tail.splitlines()[0]
    assert first.endswith("queued (api), created by request req-from-ci-42"), first
    # Without a header the middleware's own id is the one written.
    again = client.post(
        f"/api/v1/projects/{project.slug}/runs",
        json={"kind": "generate", "config": {"limit": 1}},
        headers=admin,
    )
    assert again.status_code == 201, again.text
    made = again.headers["x-request-id"]
    factory.session.commit()  # a new read snapshot, which sees the second run
    second = factory.session.get(Run, again.json()["id"])
    assert second is not None and second.log_tail.splitlines()[0].endswith(f"request {made}")
