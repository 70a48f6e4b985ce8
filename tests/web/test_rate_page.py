"""The rate page without a browser: it shows the leased comparison and a form post judges it.

The browser tests (test_rating.py) need Chromium; these run everywhere, on both backends.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.models import Assignment, ComparisonPair, Judgment
from tests.api.test_auth import _login
from tests.conftest import Factory


def test_rate_page_shows_the_pair_and_a_form_post_stores_the_judgment(
    client: TestClient, factory: Factory
) -> None:
    project = factory.project(gold_rate=0.0)
    rater = factory.user()
    pair = factory.pair(project, texts=("Left answer text", "Right answer text"), prompt="Why?")
    csrf = _login(client, rater.email)

    page = client.get(f"/p/{project.slug}/rate")
    assert page.status_code == 200
    assert "Why?" in page.text
    assert "Left answer text" in page.text and "Right answer text" in page.text
    action = re.search(rf'action="/p/{project.slug}/rate/(\d+)"', page.text)
    assert action
    assignment_id = int(action.group(1))

    sent = client.post(
        f"/p/{project.slug}/rate/{assignment_id}",
        data={"scale": "3", "csrf_token": csrf},
        headers={"HX-Request": "true"},
    )
    assert sent.status_code == 200, sent.text
    factory.session.rollback()
    judgment = factory.session.scalars(sa.select(Judgment)).one()
    assert (judgment.assignment_id, judgment.pair_id, judgment.choice) == (
        assignment_id,
        pair.id,
        "tie",
    )
    status = factory.session.scalar(
        sa.select(Assignment.status).where(Assignment.id == assignment_id)
    )
    assert status == "submitted"
    counted = factory.session.scalar(
        sa.select(ComparisonPair.judgment_count).where(ComparisonPair.id == pair.id)
    )
    assert counted == 1
