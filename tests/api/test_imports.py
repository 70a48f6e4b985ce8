"""Importing public preference data: HH-RLHF transcripts and TRL's format, gzip or not."""

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.models import ComparisonPair, Judgment, Project, Prompt, Response
from app.services import snapshots
from tests.conftest import IN_CI, Factory, bearer

# The real data set lies beside the repository (../shared), as on the team's machines and in
# CI; it is not part of the repository. Elsewhere point VERDICT_HH_RLHF_DIR at a copy.
HH_DATA = Path(
    os.environ.get(
        "VERDICT_HH_RLHF_DIR",
        Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf",
    )
)


def hh(*turns: str) -> str:
    roles = ["Human", "Assistant"]
    return "".join(f"\n\n{roles[i % 2]}: {t}" for i, t in enumerate(turns))


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("imports")


@pytest.fixture
def headers(factory: Factory) -> dict[str, str]:
    return bearer(factory.token(factory.user("admin")))


def post(
    client: TestClient, project: Project, headers: dict[str, str], content: bytes, **params: str
) -> Any:
    return client.post(
        f"/api/v1/projects/{project.slug}/imports",
        params=params,
        files={"file": ("prefs.jsonl", content, "application/octet-stream")},
        headers=headers,
    )


def lines(*records: Any) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def test_hh_rlhf_transcripts_gzip(
    client: TestClient, factory: Factory, project: Project, headers: dict[str, str]
) -> None:
    content = gzip.compress(
        lines(
            {
                "chosen": hh("Hi?", "Hello!", "How are you?", "Fine, thanks."),
                "rejected": hh("Hi?", "Hello!", "How are you?", "Go away."),
            },
            {"chosen": hh("Name a colour.", "Blue."), "rejected": hh("Name a colour.", "")},
            {"chosen": hh("Name a colour.", "Red."), "rejected": hh("Name a colour.", "Seven.")},
        )
    )
    response = post(client, project, headers, content, format="hh-rlhf")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["created"], body["prompts_created"]) == (2, 2)
    assert body["skipped"] == [{"line": 2, "reason": "an answer is empty"}]
    prompt = (
        factory.session.query(Prompt)
        .filter(Prompt.messages.isnot(None))
        .order_by(Prompt.id)
        .first()
    )
    assert prompt is not None and [m["role"] for m in prompt.messages or []] == [
        "user",
        "assistant",
        "user",
    ]
    judgments = factory.session.query(Judgment).all()
    assert {(j.rater_id, j.source, j.choice) for j in judgments} == {(None, "import:hh-rlhf", "a")}
    pairs = factory.session.query(ComparisonPair).all()
    assert all(p.judgment_count == p.required_judgments == 1 for p in pairs)  # not for raters
    # Usable by reward runs:
    examples = snapshots.load_examples(
        factory.session, snapshots.create_snapshot(factory.session, project)
    )
    factory.session.commit()
    assert {(e.chosen, e.rejected) for e in examples} == {
        ("Fine, thanks.", "Go away."),
        ("Red.", "Seven."),
    }
    again = post(client, project, headers, content, format="hh-rlhf").json()
    assert (again["created"], again["duplicates"]) == (0, 2)
    assert factory.count(Judgment) == 2


def test_trl_formats(
    client: TestClient, factory: Factory, project: Project, headers: dict[str, str]
) -> None:
    content = lines(
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon."}],
        },
        {
            "chosen": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi"},
            ],
            "rejected": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "no"},
            ],
        },
    )
    response = post(client, project, headers, content, format="trl", source="my-set")
    assert response.status_code == 200, response.text
    assert response.json()["created"] == 3
    texts = {r.text for r in factory.session.query(Response).all()}
    assert texts == {"4", "5", "Paris.", "Lyon.", "hi", "no"}
    assert {j.source for j in factory.session.query(Judgment).all()} == {"import:my-set"}


BAD = [
    (b'{"chosen": "x"}', 1, "rejected", "missing"),
    (b'{"chosen": "no markers", "rejected": "at all"}', 1, None, "must be transcripts"),
    (
        b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b",'
        b' "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}',
        1,
        None,
        "do not continue one conversation",
    ),
    (
        b'{"prompt": "q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "y"}',
        1,
        None,
        "expected {'role'",
    ),
    (b"[1, 2]", 1, None, "expected an object"),
    (b'{"chosen": "a", ', 1, None, "malformed JSON"),
    (b'{"prompt": "q", "chosen": "\xff", "rejected": "y"}', 1, None, "not valid UTF-8"),
]


@pytest.mark.parametrize(("content", "line", "field", "words"), BAD)
def test_bad_records_reject_the_whole_file(
    client: TestClient,
    factory: Factory,
    project: Project,
    headers: dict[str, str],
    content: bytes,
    line: int,
    field: str | None,
    words: str,
) -> None:
    good = lines({"prompt": "fine", "chosen": "yes", "rejected": "no"}) + b"\n"
    response = post(client, project, headers, good + content)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert any(
        e["line"] == line + 1 and e["field"] == field and words in e["message"] for e in errors
    ), errors
    assert factory.count(Prompt) == factory.count(Judgment) == 0


def test_bad_gzip_and_empty_file(
    client: TestClient, factory: Factory, project: Project, headers: dict[str, str]
) -> None:
    assert post(client, project, headers, b"\x1f\x8bnot gzip").status_code == 422
    assert post(client, project, headers, b"").status_code == 422
    assert post(client, project, headers, b"x", format="csv").status_code == 422
    assert factory.count(Prompt) == 0


def test_raters_cannot_import(client: TestClient, factory: Factory, project: Project) -> None:
    rater = bearer(factory.token(factory.user("rater")))
    assert (
        post(
            client, project, rater, lines({"prompt": "a", "chosen": "b", "rejected": "c"})
        ).status_code
        == 403
    )


def test_the_real_hh_rlhf_file_parses() -> None:
    from app.services.imports import parse_preferences

    path = HH_DATA / "harmless-base-test.jsonl.gz"
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing; CI runs with ../shared beside the repository")
        pytest.skip(f"the HH-RLHF test split is not at {path} (set VERDICT_HH_RLHF_DIR)")
    raw = path.read_bytes()
    records, skipped = parse_preferences(raw, "hh-rlhf", 10_000, 20 * 1024 * 1024)
    assert len(records) + len(skipped) == 2312
    assert all(r.prompt[-1]["role"] == "user" and r.chosen != r.rejected for r in records)
