"""Schemathesis against the app's own /openapi.json, with an admin token, on both databases:
no answer is a 5xx, and every answer matches what the document declares for its status (its
status code, content type and body schema). Schemathesis generates the requests from the
document: path and query parameters, JSON bodies, files; the `slug` is a real project's.

Two of its checks do not apply here and are off: `ignored_auth` (the health checks are public
on purpose) and `positive_data_acceptance` (a request that fits the schema may still be refused
by a rule the schema cannot say, such as an unknown email or a slug's shape: a 422 with errors).
"""

from __future__ import annotations

from typing import Any

import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from tests.conftest import Factory, bearer

CONFIG = schemathesis.Config.from_dict(
    {
        "parameters": {"slug": "fuzz"},
        "checks": {
            "ignored_auth": {"enabled": False},
            "positive_data_acceptance": {"enabled": False},
        },
    }
)
EXAMPLES_PER_OPERATION = 12
# /readyz answers 503 while no worker runs (declared, and tested in tests/api/test_readyz.py),
# which Schemathesis's server-error check would count; its body's schema is checked below.
NOT_FUZZED = {"GET /readyz"}


def test_every_operation_answers_as_documented(app: FastAPI, factory: Factory) -> None:
    project = factory.project("fuzz", overlap=1)
    for _ in range(3):
        factory.pair(project)
    headers = bearer(factory.token(factory.user("admin")))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    failures: list[str] = []
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in NOT_FUZZED:
            continue
        tried += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, at once
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert tried > 30, f"only {tried} operations in the document"
    with TestClient(app) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    schema["/readyz"]["GET"].validate_response(ready)
    assert not failures, "\n\n".join(failures)
