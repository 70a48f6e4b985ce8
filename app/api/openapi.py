"""The error answers of the API, declared once in the OpenAPI document.

Every error the API sends has one shape, `{"detail": "...", "errors": [{"line", "field",
"message"}]}` (`errors` only for invalid input): the handlers in `app.main` write it for service
errors, HTTP errors and request validation alike. FastAPI's generated document knows none of
that (it declares its own 422 shape, `HTTPValidationError`, which the API never sends), so this
module rewrites each operation's error responses from what the operation can meet:

* 401 and 403: every route that reads a token or a session (all but the health checks);
* 404: a route with a path parameter (the project, run, model, pair ... may not exist);
* 409: a write (a state that forbids it: a run already finished, a duplicate, ...);
* 413 and 415: a route with a request body;
* 422: any route with parameters or a body;
* 503: the routes that wait on a worker (scoring, the playground) and /readyz.

Schemathesis checks the answers against this document (`tests/api/test_openapi_fuzz.py`).
"""

from __future__ import annotations

from typing import Any

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {"title": "Detail", "type": "string", "description": "what went wrong"},
        "errors": {
            "title": "Errors",
            "type": "array",
            "description": "for invalid input: every problem, where it is and what",
            "items": {
                "type": "object",
                "required": ["line", "field", "message"],
                "properties": {
                    "line": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                    "field": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "message": {"type": "string"},
                },
            },
        },
    },
}
DESCRIPTIONS = {
    "401": "no valid token or session",
    "403": "the caller's role may not do this",
    "404": "not found",
    "409": "the current state forbids it",
    "413": "the body is larger than the limit",
    "415": "a content type the route does not read",
    "422": "invalid input: every error with where it is",
    "503": "a worker or a dependency did not answer in time",
}
PUBLIC = {"/healthz", "/readyz"}
WAITS_ON_WORKER = ("/score", "/generate", "/readyz")
WRITES = {"post", "put", "patch", "delete"}


def error_statuses(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    """The error statuses `operation` (at `path`, `method`) can answer."""
    statuses = [] if path in PUBLIC else ["401", "403"]
    if "{" in path:
        statuses.append("404")
    if method in WRITES:
        statuses.append("409")
    if "requestBody" in operation:
        statuses += ["413", "415"]
    if operation.get("parameters") or "requestBody" in operation:
        statuses.append("422")
    if path.endswith(WAITS_ON_WORKER):
        statuses.append("503")
    return statuses


def declare_errors(schema: dict[str, Any]) -> None:
    """Rewrite every operation's error responses in `schema` (an OpenAPI document) in place."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for status in error_statuses(path, method, operation):
                declared = responses.get(status, {})
                content = declared.get("content")
                if content is None or "HTTPValidationError" in str(content):
                    # An answer of a route's own shape (/readyz's 503) is left as it is.
                    content = {"application/json": {"schema": ERROR_REF}}
                responses[status] = {
                    "description": declared.get("description") or DESCRIPTIONS[status],
                    "content": content,
                }
    # FastAPI's own validation error shapes: nothing refers to them any more.
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
