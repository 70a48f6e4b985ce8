"""The quality API: who may read it, what it answers (the service's figures, typed), and its
OpenAPI document carrying the field descriptions."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.models import ComparisonPair, Judgment, User
from tests.conftest import Factory, bearer


def _judge(factory: Factory, pair: ComparisonPair, rater: User, choice: str, left: str) -> None:
    factory.session.add(
        Judgment(
            project_id=pair.project_id, pair_id=pair.id, rater_id=rater.id, choice=choice,
            strength=1 if choice in ("a", "b") else None, shown_left=left, active_ms=5000,
        )
    )  # fmt: skip
    factory.session.commit()


def test_raters_and_project_figures(client: TestClient, factory: Factory) -> None:
    """Two raters on two pairs: p1 both a (agree), p2 a and tie (each has one other: the
    other's choice is the consensus, and they disagree)."""
    project = factory.project("qapi")
    r1 = factory.user(email="one@example.com")
    r2 = factory.user(email="two@example.com")
    p1, p2 = factory.pair(project, prompt="q1"), factory.pair(project, prompt="q2")
    _judge(factory, p1, r1, "a", "a")
    _judge(factory, p1, r2, "a", "b")
    _judge(factory, p2, r1, "a", "a")
    _judge(factory, p2, r2, "tie", "a")
    headers = bearer(factory.token(factory.user("reviewer")))

    answer = client.get("/api/v1/projects/qapi/quality/raters", headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["median_agreement"] is None  # nobody has 5 consensus pairs
    assert body["median_active_ms"] is None  # nor 5 timed judgments
    rows = {r["email"]: r for r in body["raters"]}
    one = rows["one@example.com"]
    assert (one["judgments"], one["shared_pairs"], one["consensus_pairs"], one["agreed"]) == (
        2, 2, 2, 1,
    )  # fmt: skip
    assert one["agreement"] == 0.5
    assert one["left"]["k"] == 2 and one["left"]["n"] == 2
    assert one["excluded"] is False and one["outliers"] == []
    assert rows["two@example.com"]["tie_rate"] == 0.5
    two_left = rows["two@example.com"]["left"]
    assert (two_left["k"], two_left["n"], two_left["share"], two_left["low"]) == (0, 1, 0.0, 0.0)

    answer = client.get("/api/v1/projects/qapi/quality", headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    figures = body["figures"]
    assert (figures["judgments"], figures["pairs_judged_twice"], figures["clear_majority"]) == (
        4, 2, 0.5,
    )  # fmt: skip
    # Values: p1 {4, 4}, p2 {4, 3}: n_3 = 1, n_4 = 3, n = 4; o_34 = o_43 = 1; δ²_34 = 2² = 4.
    # D_o = 2·4/4 = 2; D_e = 2·1·3·4/(4·3) = 2; α = 1 − 2/2 = 0.
    assert abs(figures["alpha"]) < 1e-12 and figures["alpha_pairs"] == 2
    assert body["cycles"] == [] and figures["cycles"] == 0
    assert [w["figures"]["judgments"] for w in body["weeks"]] == [4]


def test_readers_only_and_unknown_project(client: TestClient, factory: Factory) -> None:
    factory.project("locked")
    rater = bearer(factory.token(factory.user("rater")))
    admin = bearer(factory.token(factory.user("admin")))
    for path in ("/api/v1/projects/locked/quality", "/api/v1/projects/locked/quality/raters"):
        assert client.get(path).status_code == 401
        refused = client.get(path, headers=rater)
        assert refused.status_code == 403 and "read project data" in refused.json()["detail"]
        assert client.get(path, headers=admin).status_code == 200
    missing = client.get("/api/v1/projects/nope/quality", headers=admin)
    assert missing.status_code == 404


def test_openapi_describes_the_fields(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    rater = schemas["RaterQualityOut"]["properties"]
    assert "Wilson" in rater["left"]["description"]
    assert "Dawid" in rater["reliability"]["description"]
    assert "ordinal" in schemas["FiguresOut"]["properties"]["alpha"]["description"]
