"""Prompt upload: JSON body, JSONL and CSV files; every bad input gets a clear 4xx with its
line and field, and a rejected upload leaves no rows behind."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.models import ComparisonPair, Project, Prompt, Response
from tests.conftest import Factory, bearer


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("uploads", overlap=2)


@pytest.fixture
def admin_headers(factory: Factory) -> dict[str, str]:
    return bearer(factory.token(factory.user("admin")))


def url(project: Project) -> str:
    return f"/api/v1/projects/{project.slug}/prompts"


def upload_file(
    client: TestClient,
    project: Project,
    headers: dict[str, str],
    content: bytes,
    filename: str = "prompts.jsonl",
    content_type: str = "application/jsonl",
) -> Any:
    return client.post(
        url(project), files={"file": (filename, content, content_type)}, headers=headers
    )


def jsonl(*records: Any) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def assert_nothing_stored(factory: Factory) -> None:
    assert factory.count(Prompt) == 0
    assert factory.count(Response) == 0
    assert factory.count(ComparisonPair) == 0


def test_json_body_creates_prompts_responses_and_pairs(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    body = {
        "prompts": [
            {"prompt": "What is RLHF?", "external_id": "q1", "metadata": {"topic": "ml"}},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi!"},
                ],
                "external_id": "q2",
                "responses": [
                    {"text": "Hello!", "model": "m1"},
                    {"text": "Hey."},
                    {"text": "Greetings.", "model": "m3"},
                ],
            },
        ]
    }
    response = client.post(url(project), json=body, headers=admin_headers)
    assert response.status_code == 200, response.text
    assert response.json() | {"generation_run_id": None} == {
        "created": 2,
        "duplicates": 0,
        "errors": 0,
        "responses_created": 3,
        "pairs_created": 3,
        "generation_run_id": None,
    }
    assert factory.count(Prompt) == 2
    assert factory.count(Response) == 3
    assert factory.count(ComparisonPair) == 3  # every pair of the 3 responses
    pairs = factory.session.query(ComparisonPair).all()
    assert {p.required_judgments for p in pairs} == {2}
    q2 = factory.session.query(Prompt).filter_by(external_id="q2").one()
    assert q2.messages and q2.messages[0]["role"] == "system" and q2.text is None
    q1 = factory.session.query(Prompt).filter_by(external_id="q1").one()
    assert q1.meta == {"topic": "ml"}


def test_same_external_id_again_is_a_duplicate_not_an_error(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    body = {"prompts": [{"prompt": "one", "external_id": "x1"}, {"prompt": "two"}]}
    assert client.post(url(project), json=body, headers=admin_headers).json()["created"] == 2
    again = client.post(url(project), json=body, headers=admin_headers).json()
    assert (again["created"], again["duplicates"]) == (1, 1)  # no external_id: always new
    assert factory.count(Prompt) == 3


def test_jsonl_upload_and_line_numbers_skip_blank_lines(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    content = b'{"prompt": "first"}\n\n{"prompt": "third", "external_id": 7}\n'
    response = upload_file(client, project, admin_headers, content)
    assert response.status_code == 200, response.text
    assert response.json()["created"] == 2
    assert factory.session.query(Prompt).filter_by(external_id="7").one().text == "third"


def test_csv_upload_with_numbered_response_columns(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    content = (
        b"external_id,prompt,metadata,response_1,model_1,response_2,model_2\n"
        b'c1,"Say ""hi""",{"k": 1},Hi!,m1,"Hello,\nthere",m2\n'
        b"c2,Plain prompt,,,,,\n"
    )
    response = upload_file(client, project, admin_headers, content, "p.csv", "text/csv")
    assert response.status_code == 200, response.text
    assert response.json()["created"] == 2 and response.json()["pairs_created"] == 1
    c1 = factory.session.query(Prompt).filter_by(external_id="c1").one()
    assert c1.text == 'Say "hi"' and c1.meta == {"k": 1}
    texts = sorted(r.text for r in factory.session.query(Response).all())
    assert texts == ["Hello,\nthere", "Hi!"]


BAD_JSONL = [
    # (content, expected line, expected field, words in the message)
    (b'{"prompt": "ok"}\n{"prompt": "broken"\n', 2, None, "malformed JSON"),
    (b'{"external_id": "a"}\n', 1, "prompt", "missing"),
    (b'{"prompt": "   "}\n', 1, "prompt", "must not be empty"),
    (b'{"prompt": 42}\n', 1, "prompt", "must be a string"),
    (b'{"prompt": "x", "metadata": [1]}\n', 1, "metadata", "must be an object"),
    (b'{"prompt": "x", "external_id": true}\n', 1, "external_id", "string or an integer"),
    (b'{"prompt": "x", "responses": "nope"}\n', 1, "responses", "must be an array"),
    (b'{"prompt": "x", "responses": [{"text": ""}]}\n', 1, "responses[0].text", "empty"),
    (b'{"prompt": "x", "colour": "red"}\n', 1, "colour", "unknown field"),
    (
        b'{"messages": [{"role": "robot", "content": "hi"}]}\n',
        1,
        "messages[0].role",
        "unknown role 'robot'",
    ),
    (
        b'{"messages": [{"role": "user", "content": "hi"},'
        b' {"role": "assistant", "content": "yo"}]}\n',
        1,
        "messages",
        "last message must be from the user",
    ),
    (b'{"messages": []}\n', 1, "messages", "must not be empty"),
    (b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}\n', 1, "prompt", "not both"),
    (b'["not", "an", "object"]\n', 1, None, "expected an object"),
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', 2, None, "not valid UTF-8"),
    (
        b'{"prompt": "a", "external_id": "d"}\n{"prompt": "b", "external_id": "d"}\n',
        2,
        "external_id",
        "duplicate external_id 'd' (first on line 2)",
    ),
]


@pytest.mark.parametrize(("content", "line", "field", "words"), BAD_JSONL)
def test_bad_jsonl_is_rejected_with_line_and_field(
    client: TestClient,
    factory: Factory,
    project: Project,
    admin_headers: dict[str, str],
    content: bytes,
    line: int,
    field: str | None,
    words: str,
) -> None:
    # A valid record first: an upload is all or nothing, so it must not be stored either.
    response = upload_file(client, project, admin_headers, b'{"prompt": "valid"}\n' + content)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert any(
        e["line"] == line + 1 and e["field"] == field and words in e["message"] for e in errors
    ), errors
    assert_nothing_stored(factory)


def test_every_error_is_reported_not_just_the_first(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    content = jsonl({"prompt": ""}, {"prompt": "ok"}, {"nothing": 1}, {"prompt": 3})
    errors = upload_file(client, project, admin_headers, content).json()["errors"]
    assert [e["line"] for e in errors] == [1, 3, 3, 4]
    assert_nothing_stored(factory)


def test_bad_json_body_records_are_numbered(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    body = {"prompts": [{"prompt": "fine"}, {"prompt": ""}, {"messages": "hi"}]}
    response = client.post(url(project), json=body, headers=admin_headers)
    assert response.status_code == 422
    assert [(e["line"], e["field"]) for e in response.json()["errors"]] == [
        (2, "prompt"),
        (3, "messages"),
    ]
    assert_nothing_stored(factory)


def test_malformed_json_body(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    response = client.post(
        url(project),
        content=b'{"prompts": [',
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert "malformed JSON" in response.json()["errors"][0]["message"]
    missing = client.post(url(project), json={"items": []}, headers=admin_headers)
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "prompts"
    assert_nothing_stored(factory)


def test_empty_file(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    for content, name, ctype in [
        (b"", "p.jsonl", "application/jsonl"),
        (b"\n\n", "p.jsonl", "application/jsonl"),
        (b"", "p.csv", "text/csv"),
        (b"prompt\n", "p.csv", "text/csv"),
    ]:
        response = upload_file(client, project, admin_headers, content, name, ctype)
        assert response.status_code == 422, (content, name)
        assert "no records" in response.json()["detail"]
    assert_nothing_stored(factory)


def test_unsupported_content_type_is_415(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    as_text = client.post(
        url(project), content=b"prompt", headers={**admin_headers, "Content-Type": "text/plain"}
    )
    assert as_text.status_code == 415
    as_xlsx = upload_file(
        client, project, admin_headers, b"PK\x03\x04", "p.xlsx", "application/vnd.ms-excel"
    )
    assert as_xlsx.status_code == 415 and "JSONL" in as_xlsx.json()["detail"]
    assert_nothing_stored(factory)


def test_file_larger_than_the_limit_is_413(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    big = jsonl(*({"prompt": "x" * 1000} for _ in range(100)))  # > 64 KiB test limit
    response = upload_file(client, project, admin_headers, big)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert_nothing_stored(factory)


def test_more_records_than_the_limit(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    content = jsonl(*({"prompt": f"p{i}"} for i in range(101)))  # test limit is 100
    response = upload_file(client, project, admin_headers, content)
    assert response.status_code == 422
    assert "too many records" in response.json()["detail"]
    body = client.post(
        url(project), json={"prompts": [{"prompt": "x"}] * 101}, headers=admin_headers
    )
    assert body.status_code == 422
    assert_nothing_stored(factory)


def test_bad_csv(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    cases = [
        (b"prompt,colour\nhi,red\n", 1, "colour", "unknown column"),
        (b"external_id\nx\n", 1, "prompt", "needs a 'prompt'"),
        (b"prompt,external_id\nhi\n", 2, None, "expected 2 columns, found 1"),
        (b"prompt,metadata\nhi,{bad json\n", 2, "metadata", "malformed JSON"),
        (b"prompt\nok\n\xff\xfe\n", 3, None, "not valid UTF-8"),
        (b'prompt,response_1\nok,\n"",r\n', 3, "prompt", "missing"),
    ]
    for content, line, field, words in cases:
        response = upload_file(client, project, admin_headers, content, "p.csv", "text/csv")
        assert response.status_code == 422, content
        errors = response.json()["errors"]
        assert any(
            e["line"] == line and e["field"] == field and words in e["message"] for e in errors
        ), (content, errors)
    assert_nothing_stored(factory)


def test_multipart_without_file_field(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    response = client.post(
        url(project),
        data={"other": "x"},
        files={"upload": ("p.jsonl", b'{"prompt":"x"}', "application/jsonl")},
        headers=admin_headers,
    )
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "file"
    assert_nothing_stored(factory)


def test_unknown_project_is_404(client: TestClient, admin_headers: dict[str, str]) -> None:
    response = client.post(
        "/api/v1/projects/nope/prompts", json={"prompts": [{"prompt": "x"}]}, headers=admin_headers
    )
    assert response.status_code == 404


def test_list_prompts_is_paginated(
    client: TestClient, factory: Factory, project: Project, admin_headers: dict[str, str]
) -> None:
    body = {"prompts": [{"prompt": f"p{i}", "external_id": f"e{i}"} for i in range(7)]}
    client.post(url(project), json=body, headers=admin_headers)
    page = client.get(url(project), params={"offset": 5, "limit": 5}, headers=admin_headers).json()
    assert page["total"] == 7 and [p["external_id"] for p in page["items"]] == ["e5", "e6"]
    too_big = client.get(url(project), params={"limit": 10_000}, headers=admin_headers)
    assert too_big.status_code == 422
