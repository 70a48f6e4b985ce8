"""Property tests of every upload and import path: any JSON value in any field of any format is
answered with a 2xx or a 4xx, never a 5xx, and whatever a 2xx stored lists back through the API.

Hypothesis draws the values: every JSON type, nested (deeply, sometimes), with strings that hold
NUL characters, lone surrogates, long runs and non-BMP characters, and the floats JSON cannot
represent (NaN, infinities: Python's `json.dumps` writes them and `json.loads` reads them). Each
value goes into one field of a record that is otherwise valid, so the field under test is what
decides the answer. Runs on SQLite and PostgreSQL (the `client` fixture).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.models import Project, Prompt
from tests.conftest import Factory, bearer

# Strings the databases refuse or that stress decoding, mixed into ordinary text.
AWKWARD = st.sampled_from(["\x00", "\ud800", "\udfff", "\U0001f600", "é", "\r\n", "\\", '"'])
TEXT = st.one_of(
    st.text(max_size=20),
    st.lists(st.one_of(st.text(max_size=5), AWKWARD), max_size=6).map("".join),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


def deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


# Values nested around the documented limit of 64, as well as the usual shallow ones.
VALUES = st.one_of(
    JSON_VALUES,
    st.tuples(JSON_VALUES, st.integers(min_value=55, max_value=70)).map(lambda t: deep(*t)),
)

PROMPT_FIELDS = ["prompt", "messages", "external_id", "metadata", "responses", "extra"]
RESPONSE_FIELDS = ["text", "model", "extra"]
PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("props", overlap=1)


@pytest.fixture
def headers(factory: Factory) -> dict[str, str]:
    return bearer(factory.token(factory.user("admin")))


def prompt_record(field: str, value: Any, n: int) -> dict[str, Any]:
    """A valid record but for `field` (a top-level one, or `responses[0].<name>`)."""
    record: dict[str, Any] = {"prompt": f"prompt {n}", "external_id": f"x{n}"}
    if field.startswith("responses[0]."):
        response: dict[str, Any] = {"text": "an answer", "model": "m"}
        response[field.removeprefix("responses[0].")] = value
        record["responses"] = [response, {"text": "another answer"}]
    else:
        record[field] = value
    return record


def dumps(value: Any) -> bytes:
    # ensure_ascii writes a lone surrogate as its \\u escape: the bytes stay valid UTF-8.
    return json.dumps(value).encode()


def csv_bytes(header: list[str], row: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerow(row)
    # A lone surrogate cannot be UTF-8: it reaches the server as the invalid bytes a broken
    # client would send.
    return out.getvalue().encode("utf-8", "surrogatepass")


def check_answer(client: TestClient, response: Any, project: Project, headers: Any) -> None:
    """A 2xx or a 4xx with errors; afterwards the project's prompts list back, all of them."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json().get("detail") or response.json().get("errors"), response.text
    total, offset = None, 0
    url = f"/api/v1/projects/{project.slug}/prompts"
    listed = 0
    while total is None or offset < total:
        page = client.get(url, params={"offset": offset, "limit": 200}, headers=headers)
        assert page.status_code == 200, page.text
        body = page.json()
        total, offset = body["total"], offset + body["limit"]
        listed += len(body["items"])
    assert listed == total


def post_prompts(client: TestClient, url: str, headers: Any, how: str, record: Any) -> Any:
    if how == "json":
        return client.post(
            url,
            content=dumps({"prompts": [record]}),
            headers={**headers, "Content-Type": "application/json"},
        )
    return client.post(
        url,
        files={"file": ("p.jsonl", dumps(record) + b"\n", "application/octet-stream")},
        headers=headers,
    )


@PROPERTY_SETTINGS
@given(
    how=st.sampled_from(["json", "jsonl"]),
    field=st.sampled_from(PROMPT_FIELDS + [f"responses[0].{f}" for f in RESPONSE_FIELDS]),
    value=VALUES,
    n=st.integers(min_value=0, max_value=10**9),
)
# Found by Hypothesis: an error quoting a lone surrogate key could not be encoded (500).
@example(how="jsonl", field="messages", value=[{"\ud800": None}], n=0)
def test_any_value_in_any_prompt_field(
    client: TestClient,
    project: Project,
    headers: dict[str, str],
    how: str,
    field: str,
    value: Any,
    n: int,
) -> None:
    url = f"/api/v1/projects/{project.slug}/prompts"
    response = post_prompts(client, url, headers, how, prompt_record(field, value, n))
    check_answer(client, response, project, headers)


@PROPERTY_SETTINGS
@given(
    column=st.sampled_from(["prompt", "messages", "external_id", "metadata", "responses",
                            "response_1", "model_1"]),
    cell=st.one_of(TEXT, VALUES.map(json.dumps)),
    n=st.integers(min_value=0, max_value=10**9),
)  # fmt: skip
def test_any_cell_in_any_csv_column(
    client: TestClient,
    project: Project,
    headers: dict[str, str],
    column: str,
    cell: str,
    n: int,
) -> None:
    row = {"prompt": f"prompt {n}", "external_id": f"c{n}"}
    if column in ("response_1", "model_1"):
        row |= {"response_1": "an answer", "response_2": "another", "model_1": "m"}
    row[column] = cell
    if column == "messages":
        del row["prompt"]
    response = client.post(
        f"/api/v1/projects/{project.slug}/prompts",
        files={"file": ("p.csv", csv_bytes(list(row), list(row.values())), "text/csv")},
        headers=headers,
    )
    check_answer(client, response, project, headers)


@PROPERTY_SETTINGS
@given(
    fmt=st.sampled_from(["auto", "trl", "hh-rlhf"]),
    field=st.sampled_from(["prompt", "chosen", "rejected", "extra"]),
    value=VALUES,
    gzipped=st.booleans(),
)
def test_any_value_in_any_import_field(
    client: TestClient,
    factory: Factory,
    project: Project,
    headers: dict[str, str],
    fmt: str,
    field: str,
    value: Any,
    gzipped: bool,
) -> None:
    record: dict[str, Any] = (
        {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
        if fmt == "hh-rlhf"
        else {"prompt": "hi", "chosen": "yes", "rejected": "no"}
    )
    record[field] = value
    payload = dumps(record) + b"\n"
    if gzipped:
        payload = gzip.compress(payload)
    before = factory.count(Prompt)
    response = client.post(
        f"/api/v1/projects/{project.slug}/imports",
        params={"format": fmt},
        files={"file": ("prefs.jsonl", payload, "application/octet-stream")},
        headers=headers,
    )
    check_answer(client, response, project, headers)
    if response.status_code >= 400:
        assert factory.count(Prompt) == before  # all or nothing
