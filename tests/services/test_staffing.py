"""Per-project staffing: a project with members is rated by its members (and admins and
reviewers) only; one without is open to every rater. Through the services and the API, on
both backends."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.models import Assignment, AuditEvent, Judgment, Project, ProjectMember, User
from app.services import assignment as assignment_service
from app.services import judgments, staffing
from app.services.errors import InvalidInput, NotFound, PermissionDenied
from tests.conftest import Factory, bearer
from tests.console.conftest import counted_statements

VOTE = judgments.JudgmentInput(choice="a", strength=1)


def staff(factory: Factory, project: Project, *raters: User, actor: User | None = None) -> None:
    factory.session.commit()
    for rater in raters:
        staffing.add_member(factory.session, project, rater, actor_id=actor.id if actor else None)
    factory.session.commit()


def unstaff(factory: Factory, project: Project, rater: User, actor: User) -> int:
    factory.session.commit()
    left = staffing.remove_member(factory.session, project, rater.id, actor=actor).members_left
    factory.session.commit()
    return left


def next_for(factory: Factory, project: Project | str, rater: User) -> Assignment | None:
    factory.session.commit()
    try:
        return assignment_service.next_assignment(factory.session, project, rater)
    finally:
        factory.session.commit()


def test_a_staffed_project_refuses_a_non_member_and_serves_a_member(factory: Factory) -> None:
    project = factory.project(gold_rate=0.0)
    pair = factory.pair(project)
    member, outsider = factory.user(), factory.user()
    staff(factory, project, member)
    for by in (project, project.slug):  # the rater page's path and the API's
        with pytest.raises(PermissionDenied, match="not on the staff"):
            next_for(factory, by, outsider)
    got = next_for(factory, project.slug, member)
    assert got is not None and got.pair_id == pair.id
    assert factory.count(Assignment) == 1  # the outsider leased nothing
    assert staffing.may_rate(factory.session, project, member)
    assert not staffing.may_rate(factory.session, project, outsider)


def test_an_unstaffed_project_serves_every_rater(factory: Factory) -> None:
    project = factory.project(gold_rate=0.0, overlap=3)
    factory.pair(project)
    raters = [factory.user() for _ in range(3)]
    for rater in raters:
        assert next_for(factory, project, rater) is not None
        assert staffing.may_rate(factory.session, project, rater)
    assert factory.count(Assignment) == 3


def test_removing_the_last_member_opens_the_project_again(factory: Factory) -> None:
    project = factory.project(gold_rate=0.0, overlap=2)
    factory.pair(project)
    admin, member, other = factory.user("admin"), factory.user(), factory.user()
    staff(factory, project, member, actor=admin)
    with pytest.raises(PermissionDenied):
        next_for(factory, project, other)
    assert unstaff(factory, project, member, admin) == 0
    assert next_for(factory, project, other) is not None
    assert factory.count(ProjectMember) == 0
    actions = factory.session.scalars(
        sa.select(AuditEvent.action).where(AuditEvent.action.like("project.staff.%"))
    ).all()
    assert sorted(actions) == ["project.staff.add", "project.staff.remove"]


def test_admins_and_reviewers_rate_a_staffed_project(factory: Factory) -> None:
    project = factory.project(gold_rate=0.0, overlap=3)
    factory.pair(project)
    staff(factory, project, factory.user())
    for role in ("admin", "reviewer"):
        someone = factory.user(role)
        assert next_for(factory, project, someone) is not None
        assert next_for(factory, project.slug, someone) is not None  # the same lease again


def test_a_rater_taken_off_the_staff_cannot_go_on_with_a_lease(factory: Factory) -> None:
    project = factory.project(gold_rate=0.0, overlap=1)
    first, second = factory.pair(project), factory.pair(project)
    admin, member, stays = factory.user("admin"), factory.user(), factory.user()
    staff(factory, project, member, stays)
    done = next_for(factory, project, member)
    assert done is not None
    judgments.submit(factory.session, done.id, member, VOTE)
    factory.session.commit()
    held = next_for(factory, project, member)
    assert held is not None and {done.pair_id, held.pair_id} == {first.id, second.id}
    unstaff(factory, project, member, admin)
    with pytest.raises(PermissionDenied):
        next_for(factory, project, member)
    with pytest.raises(PermissionDenied, match="not on the staff"):
        judgments.submit(factory.session, held.id, member, VOTE)
    factory.session.rollback()
    # A retry of the judgment stored while they were on the staff still answers with it.
    again = judgments.submit(factory.session, done.id, member, VOTE)
    factory.session.commit()
    assert again.assignment_id == done.id
    assert factory.count(Judgment) == 1


def test_the_start_page_lists_what_each_user_may_rate(factory: Factory) -> None:
    open_project, staffed, other_staffed = factory.project(), factory.project(), factory.project()
    member, outsider, reviewer = factory.user(), factory.user(), factory.user("reviewer")
    staff(factory, staffed, member)
    staff(factory, other_staffed, outsider)

    def slugs(user: User) -> list[str]:
        return [p.slug for p in staffing.rateable_projects(factory.session, user)]

    assert slugs(member) == [open_project.slug, staffed.slug]
    assert slugs(outsider) == [open_project.slug, other_staffed.slug]
    assert slugs(reviewer) == [open_project.slug, staffed.slug, other_staffed.slug]


def test_staff_form_rules(factory: Factory) -> None:
    project = factory.project()
    admin, rater, reviewer = factory.user("admin"), factory.user(), factory.user("reviewer")
    s = factory.session

    def refused(**form: str) -> dict[str, str]:
        with pytest.raises(InvalidInput) as caught:
            staffing.staff(s, project, actor=admin, **form)
        s.rollback()
        return {str(e.field): e.message for e in caught.value.errors}

    assert "no user has the email" in refused(email="nobody@example.com")["email"]
    assert "rate every project" in refused(email=reviewer.email)["email"]
    assert "pick one" in refused()["email"]
    assert refused(user_id="999999") == {"user_id": "no such user"}
    added = staffing.staff(s, project, email=f"  {rater.email.upper()} ", actor=admin)
    assert added.id == rater.id
    staffing.staff(s, project, user_id=str(rater.id), actor=admin)  # again: harmless
    s.commit()
    assert factory.count(ProjectMember) == 1
    assert [m.user.id for m in staffing.members(s, project)] == [rater.id]
    assert staffing.candidates(s, project) == []
    with pytest.raises(NotFound):
        staffing.remove_member(s, project, reviewer.id, actor=admin)


def test_next_checks_staffing_without_a_statement_of_its_own(factory: Factory) -> None:
    """The membership condition rides in the statement that locks the rater: `next` runs as
    many statements on a staffed project as on an open one."""
    engine = factory.session.get_bind()
    assert isinstance(engine, sa.Engine)
    counts = {}
    for staffed in (False, True):
        project = factory.project(gold_rate=0.0, overlap=3)
        factory.pair(project)
        for by in ("object", "slug"):
            rater = factory.user()
            if staffed:
                staff(factory, project, rater)
            with counted_statements(engine) as statements:
                got = assignment_service.next_assignment(
                    factory.session, project if by == "object" else project.slug, rater
                )
                assert got is not None
            factory.session.commit()
            counts[staffed, by] = len(statements)
    assert counts[True, "object"] == counts[False, "object"]
    assert counts[True, "slug"] == counts[False, "slug"]


def test_the_api_answers_403_to_a_non_member(client: TestClient, factory: Factory) -> None:
    project = factory.project(gold_rate=0.0, overlap=2)
    factory.pair(project)
    admin, member, outsider, stays = (factory.user("admin"), factory.user(), factory.user(),
                                      factory.user())  # fmt: skip
    member_auth, outsider_auth = bearer(factory.token(member)), bearer(factory.token(outsider))
    staff(factory, project, member, stays)
    url = f"/api/v1/projects/{project.slug}/assignments/next"
    refused = client.get(url, headers=outsider_auth)
    assert refused.status_code == 403
    assert "not on the staff" in refused.json()["detail"]
    leased = client.get(url, headers=member_auth)
    assert leased.status_code == 200
    assignment_id = leased.json()["id"]
    unstaff(factory, project, member, admin)
    judged = client.post(
        f"/api/v1/assignments/{assignment_id}/judgment",
        json={"choice": "a", "strength": 1},
        headers=member_auth,
    )
    assert judged.status_code == 403 and "not on the staff" in judged.json()["detail"]
    assert factory.count(Judgment) == 0
    # Taking the last member off opens the project: both are served.
    unstaff(factory, project, stays, admin)
    assert client.get(url, headers=outsider_auth).status_code == 200
    judged = client.post(
        f"/api/v1/assignments/{assignment_id}/judgment",
        json={"choice": "a", "strength": 1},
        headers=member_auth,
    )
    assert judged.status_code == 200 and factory.count(Judgment) == 1
