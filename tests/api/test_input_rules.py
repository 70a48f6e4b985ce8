"""The input rules of `app.services.inputs` on every upload path: a NUL character or a lone
surrogate in any stored string, or JSON nested past the limit, is a 422 with its line and field
(never a 500, on SQLite and on PostgreSQL), nothing is stored, and what is stored lists back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.models import Judgment, Project, Prompt
from app.services import inputs
from tests.conftest import Factory, bearer


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("rules", overlap=2)


@pytest.fixture
def headers(factory: Factory) -> dict[str, str]:
    return bearer(factory.token(factory.user("admin")))


def nested(depth: int) -> Any:
    """An object holding arrays `depth` containers deep in all (the object counts as 1)."""
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"deep": value}


def test_the_rules_by_hand() -> None:
    assert inputs.string_problem("fine ✓") is None
    assert inputs.string_problem("ab\x00c") == "contains a NUL character (at character 3)"
    assert inputs.string_problem("a\ud800") == "contains a lone surrogate U+D800 (at character 2)"
    assert inputs.value_problem({"k": ["v", {"x": 1}]}) is None
    assert (
        inputs.value_problem({"k\x00": 1})
        == "key 'k\\x00' contains a NUL character (at character 2)"
    )
    assert (
        inputs.value_problem({"k": ["ok", "no\x00"]}) == "contains a NUL character (at character 3)"
    )
    assert inputs.depth_exceeds(nested(64), 64) is False
    assert inputs.depth_exceeds(nested(65), 64) is True
    assert inputs.value_problem(nested(65)) == "nested more than 64 levels deep"
    with pytest.raises(inputs.NestedTooDeep):
        inputs.loads("[" * 100_000 + "]" * 100_000)  # past Python's recursion limit
    assert inputs.loads(json.dumps(nested(64))) == nested(64)


BAD_PROMPT_RECORDS = [
    ({"prompt": "ok", "external_id": "id\x00"}, "external_id", "NUL"),
    ({"prompt": "ok", "metadata": {"k": "v\x00"}}, "metadata", "NUL"),
    ({"prompt": "ok", "metadata": {"k\x00": "v"}}, "metadata", "NUL"),
    ({"prompt": "ok", "responses": [{"text": "t", "model": "m\x00"}]}, "responses[0].model", "NUL"),
    ({"prompt": "ok\ud800"}, "prompt", "lone surrogate"),
    ({"prompt": "ok", "metadata": nested(300)}, None, "nested more than 64 levels"),
]


@pytest.mark.parametrize(("record", "field", "words"), BAD_PROMPT_RECORDS)
def test_prompt_uploads_refuse_what_cannot_be_stored(
    client: TestClient,
    factory: Factory,
    project: Project,
    headers: dict[str, str],
    record: dict[str, Any],
    field: str | None,
    words: str,
) -> None:
    url = f"/api/v1/projects/{project.slug}/prompts"
    good = {"prompt": "valid"}
    # A JSON body: the envelope {"prompts": [...]} does not count towards the limit.
    body = json.dumps({"prompts": [good, record]}).encode()
    as_body = client.post(
        url, content=body, headers={**headers, "Content-Type": "application/json"}
    )
    # A JSONL file, and the record's metadata as a CSV cell.
    as_file = client.post(
        url,
        files={"file": ("p.jsonl", (json.dumps(good) + "\n" + json.dumps(record)).encode(),
                        "application/jsonl")},
        headers=headers,
    )  # fmt: skip
    for response in (as_body, as_file):
        assert response.status_code == 422, response.text
        errors = response.json()["errors"]
        if field is None and response is as_body:
            assert any(words in e["message"] for e in errors), errors
        else:
            assert any(
                e["line"] == 2 and e["field"] == (field or e["field"]) and words in e["message"]
                for e in errors
            ), errors
    assert factory.count(Prompt) == 0


def test_a_csv_metadata_cell_nested_too_deep(
    client: TestClient, factory: Factory, project: Project, headers: dict[str, str]
) -> None:
    cell = json.dumps(nested(100)).replace('"', '""')
    content = f'prompt,metadata\nfine,{{}}\nhello,"{cell}"\n'.encode()
    response = client.post(
        f"/api/v1/projects/{project.slug}/prompts",
        files={"file": ("p.csv", content, "text/csv")},
        headers=headers,
    )
    assert response.status_code == 422, response.text
    assert [(e["line"], e["field"]) for e in response.json()["errors"]] == [(3, "metadata")]
    assert factory.count(Prompt) == 0


def test_a_deep_json_body_is_a_422_not_a_500(
    client: TestClient, project: Project, headers: dict[str, str]
) -> None:
    body = b'{"prompts": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    response = client.post(
        f"/api/v1/projects/{project.slug}/prompts",
        content=body,
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert "nested more than 64 levels deep" in response.json()["errors"][0]["message"]


def test_metadata_at_the_limit_is_stored_and_lists_back(
    client: TestClient, factory: Factory, project: Project, headers: dict[str, str]
) -> None:
    url = f"/api/v1/projects/{project.slug}/prompts"
    metadata = nested(63)  # the record object is the 64th level
    response = client.post(
        url,
        files={"file": ("p.jsonl", json.dumps({"prompt": "deep", "metadata": metadata}).encode(),
                        "application/jsonl")},
        headers=headers,
    )  # fmt: skip
    assert response.status_code in (200, 201), response.text
    listed = client.get(url, headers=headers)
    assert listed.status_code == 200, listed.text
    assert [p["meta"] for p in listed.json()["items"]] == [metadata]


BAD_IMPORTS = [
    (json.dumps({"prompt": "p\x00", "chosen": "a", "rejected": "b"}), "prompt[0].content", "NUL"),
    (json.dumps({"prompt": "p", "chosen": "a\x00", "rejected": "b"}), "chosen", "NUL"),
    (json.dumps({"prompt": "p", "chosen": "a", "rejected": "b\udfff"}), "rejected", "surrogate"),
    # Deeper than json.dumps itself can write: Python's parser would raise RecursionError.
    ('{"chosen": ' + "[" * 5000 + "]" * 5000 + ', "rejected": "b"}', None, "nested more than 64"),
]


@pytest.mark.parametrize(("record", "field", "words"), BAD_IMPORTS)
def test_imports_refuse_what_cannot_be_stored(
    client: TestClient,
    factory: Factory,
    project: Project,
    headers: dict[str, str],
    record: str,
    field: str | None,
    words: str,
) -> None:
    good = json.dumps({"prompt": "fine", "chosen": "yes", "rejected": "no"})
    response = client.post(
        f"/api/v1/projects/{project.slug}/imports",
        files={"file": ("prefs.jsonl", (good + "\n" + record).encode(),
                        "application/octet-stream")},
        headers=headers,
    )  # fmt: skip
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert any(e["line"] == 2 and (field is None or field in e["message"]) and words in e["message"]
               for e in errors), errors  # fmt: skip
    assert factory.count(Prompt) == factory.count(Judgment) == 0


def test_every_json_body_and_query_parameter_follows_the_rules(
    client: TestClient, factory: Factory, project: Project, headers: dict[str, str]
) -> None:
    """Not only uploads: a token's or a project's name, a judgment's rationale, a run's config,
    a query parameter. (Found by Schemathesis: a token named "\\x00" answered 500.)"""
    json_headers = {**headers, "Content-Type": "application/json"}
    bodies = [
        ("/api/v1/tokens", '{"name": "\\u0000"}', "name", "NUL"),
        ("/api/v1/tokens", '{"name": "a\\ud800"}', "name", "lone surrogate"),
        ("/api/v1/projects", '{"slug": "fine", "name": "x\\u0000"}', "name", "NUL"),
        (f"/api/v1/projects/{project.slug}/runs",
         '{"kind": "generate", "config": {"note\\u0000": 1}}', "config", "NUL"),
    ]  # fmt: skip
    for url, body, field, words in bodies:
        response = client.post(url, content=body, headers=json_headers)
        assert response.status_code == 422, (url, response.text)
        errors = response.json()["errors"]
        assert any(e["field"] == field and words in e["message"] for e in errors), errors
    # A query parameter reaches a query: on PostgreSQL the last line of the rules answers.
    response = client.get("/api/v1/audit", params={"actor": "a\x00b"}, headers=headers)
    assert response.status_code == 422, response.text
    assert factory.count(Project) == 1


def test_texts_longer_than_their_column_are_422s_at_their_field(
    client: TestClient, factory: Factory, project: Project, headers: dict[str, str]
) -> None:
    """PostgreSQL refuses a VARCHAR(200) of 201 characters (500 before); SQLite would have
    stored it. Each is refused at its field on both."""
    long = "y" * 201
    calls = [
        ("post", "/api/v1/tokens", {"name": long}, "name"),
        ("post", "/api/v1/projects", {"slug": "fine", "name": long}, "name"),
        ("patch", f"/api/v1/projects/{project.slug}", {"name": long}, "name"),
        ("post", "/api/v1/users",
         {"email": "a" * 320 + "@example.com", "password": "correct horse battery",
          "role": "rater"}, "email"),
    ]  # fmt: skip
    for method, url, body, field in calls:
        response = client.request(method, url, json=body, headers=headers)
        assert response.status_code == 422, (url, response.text)
        assert [e["field"] for e in response.json()["errors"]] == [field], response.text
    assert factory.count(Project) == 1
