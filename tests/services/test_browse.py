"""The prompt browser's queries against a small hand-made project whose answers are known:
every filter alone and combined, the per-row figures, keyset pages, the capped count, held out
computed in SQL exactly as `evaluation.is_heldout`, the prompt page's data and marking gold.
Each runs on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, Project, Prompt, Response, User
from app.services import browse
from app.services.browse import PromptFilter
from app.services.errors import InvalidInput, NotFound
from app.services.evaluation import is_heldout
from tests.conftest import Factory


@dataclass
class Small:
    """Six prompts of one project (and one of another), each there for a filter."""

    project: Project
    other: Project
    rater: User
    cats: Prompt  # text; 2 responses, a pair judged twice, one judgment flagged
    chat: Prompt  # a chat (system, user, assistant, user); no responses
    literal: Prompt  # text with LIKE wildcards; a pair nobody judged
    imported: Prompt  # from an import: a pair with one judgment of no rater
    delta: Prompt  # one response, so no pair
    foreign: Prompt  # in the other project: never shown
    cats_pair: ComparisonPair
    literal_pair: ComparisonPair

    def ids(self, *prompts: Prompt) -> list[int]:
        """Newest first, as the browser lists them."""
        return sorted((p.id for p in prompts), reverse=True)

    @property
    def mine(self) -> list[Prompt]:
        return [self.cats, self.chat, self.literal, self.imported, self.delta]


def _prompt(s: Session, project: Project, **fields: object) -> Prompt:
    prompt = Prompt(project_id=project.id, **fields)
    s.add(prompt)
    s.flush()
    return prompt


def _responses(s: Session, prompt: Prompt, n: int) -> list[Response]:
    rows = [Response(prompt_id=prompt.id, text=f"answer {i}", model_name="m") for i in range(n)]
    s.add_all(rows)
    s.flush()
    return rows


def _pair(s: Session, prompt: Prompt, judgments: int = 0) -> ComparisonPair:
    a, b = _responses(s, prompt, 2)
    pair = ComparisonPair(
        project_id=prompt.project_id, prompt_id=prompt.id, response_a_id=a.id,
        response_b_id=b.id, required_judgments=3, judgment_count=judgments,
    )  # fmt: skip
    s.add(pair)
    s.flush()
    return pair


def build_small(factory: Factory, **settings: object) -> Small:
    """The small project (held out: half the prompts, by seed 11, unless `settings` say)."""
    project = factory.project("small", **({"heldout_fraction": 0.5, "heldout_seed": 11} | settings))
    other = factory.project("elsewhere")
    raters = [factory.user(), factory.user()]
    s = factory.session
    cats = _prompt(s, project, text="Alpha question about Cats?", external_id="ext-1",
                   source="upload")  # fmt: skip
    cats_pair = _pair(s, cats, judgments=2)
    s.add_all(
        [
            Judgment(project_id=project.id, pair_id=cats_pair.id, rater_id=raters[0].id,
                     choice="a", strength=2, flags=["unsafe"], rationale="<b>bold</b> claim",
                     aspects={"helpfulness": "a"}, shown_left="b", active_ms=4200),
            Judgment(project_id=project.id, pair_id=cats_pair.id, rater_id=raters[1].id,
                     choice="tie", flags=[]),
        ]
    )  # fmt: skip
    chat = _prompt(
        s, project, external_id="chat-2", source="api",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Tell me about DOGS"},
            {"role": "assistant", "content": "Which dogs?"},
            {"role": "user", "content": "Terriers, please"},
        ],
    )  # fmt: skip
    literal = _prompt(s, project, text="100% sure_thing", external_id="x_3", source="upload")
    literal_pair = _pair(s, literal)
    imported = _prompt(s, project, text="Gamma", source="import:hh-rlhf")
    imported_pair = _pair(s, imported, judgments=1)
    s.add(
        Judgment(project_id=project.id, pair_id=imported_pair.id, rater_id=None, choice="a",
                 strength=1, source="import:hh-rlhf")
    )  # fmt: skip
    delta = _prompt(s, project, text="Delta", source="api")
    _responses(s, delta, 1)
    foreign = _prompt(s, other, text="Alpha question about cats, elsewhere", source="api")
    _pair(s, foreign, judgments=0)
    s.commit()
    return Small(project, other, raters[0], cats, chat, literal, imported, delta, foreign,
                 cats_pair, literal_pair)  # fmt: skip


@pytest.fixture
def small(factory: Factory) -> Small:
    return build_small(factory)


def listed(session: Session, small: Small, **params: str) -> list[int]:
    page = browse.list_prompts(session, small.project, PromptFilter.from_params(params))
    return [r.id for r in page.rows]


def test_everything_newest_first_with_the_figures_of_each_row(
    session: Session, small: Small
) -> None:
    page = browse.list_prompts(session, small.project, PromptFilter())
    assert [r.id for r in page.rows] == small.ids(*small.mine)
    assert (page.total, page.total_capped, page.total_label) == (5, False, "5")
    assert (page.newer_before, page.older_after) == (None, None)
    assert page.sources == ["api", "import:hh-rlhf", "upload"]
    rows = {r.id: r for r in page.rows}
    figures = {pid: (r.responses, r.pairs, r.judgments, r.flagged) for pid, r in rows.items()}
    assert figures == {
        small.cats.id: (2, 1, 2, True),
        small.chat.id: (0, 0, 0, False),
        small.literal.id: (2, 1, 0, False),
        small.imported.id: (2, 1, 1, False),
        small.delta.id: (1, 0, 0, False),
    }
    chat = rows[small.chat.id]
    assert (chat.text, chat.is_chat, chat.external_id) == ("Tell me about DOGS", True, "chat-2")
    assert rows[small.cats.id].text == "Alpha question about Cats?"
    assert {r.id for r in page.rows if r.heldout} == {
        p.id for p in small.mine if is_heldout(p.id, 0.5, 11)
    }


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"q": "cats"}, ["cats"]),  # case-insensitive, and never the other project's
        ({"q": "dogs"}, ["chat"]),  # a chat's message content
        ({"q": "terriers"}, ["chat"]),  # ... any of its messages
        ({"q": "role"}, []),  # not the JSON's keys
        ({"q": "%"}, ["literal"]),  # LIKE wildcards are plain characters
        ({"q": "_"}, ["literal"]),
        ({"q": "ext-1"}, ["cats"]),  # an exact external id
        ({"q": "ext"}, []),  # ... and only an exact one
        ({"q": "x_3"}, ["literal"]),
        ({"source": "api"}, ["chat", "delta"]),
        ({"source": "import:hh-rlhf"}, ["imported"]),
        ({"source": "nowhere"}, []),
        ({"responses": "yes"}, ["cats", "literal", "imported", "delta"]),
        ({"responses": "no"}, ["chat"]),
        ({"judged": "yes"}, ["cats", "imported"]),
        ({"judged": "no"}, ["chat", "literal", "delta"]),
        ({"flagged": "yes"}, ["cats"]),
        ({"source": "upload", "judged": "no"}, ["literal"]),
        ({"q": "a", "responses": "no"}, ["chat"]),
        ({"q": "alpha", "flagged": "yes", "judged": "yes"}, ["cats"]),
        ({"judged": "maybe", "flagged": "no"}, ["cats", "chat", "literal", "imported", "delta"]),
    ],
    ids=lambda v: str(v),
)
def test_each_filter(
    session: Session, small: Small, params: dict[str, str], expected: list[str]
) -> None:
    want = small.ids(*(getattr(small, name) for name in expected))
    assert listed(session, small, **params) == want
    count = browse.count_prompts(session, small.project, PromptFilter.from_params(params))
    assert count == (len(want), False)


def test_held_out_filter_matches_is_heldout(session: Session, small: Small) -> None:
    held = [p for p in small.mine if is_heldout(p.id, 0.5, 11)]
    kept = [p for p in small.mine if not is_heldout(p.id, 0.5, 11)]
    assert listed(session, small, heldout="yes") == small.ids(*held)
    assert listed(session, small, heldout="no") == small.ids(*kept)
    both = [p for p in held if p in (small.cats, small.imported)]
    assert listed(session, small, heldout="yes", judged="yes") == small.ids(*both)


@pytest.mark.parametrize(("fraction", "seed"), [(0.2, 0), (0.5, 11), (0.05, -3), (0.9, 7)])
def test_held_out_in_sql_is_exactly_is_heldout(
    factory: Factory, fraction: float, seed: int
) -> None:
    project = factory.project(heldout_fraction=fraction, heldout_seed=seed)
    s = factory.session
    s.execute(sa.insert(Prompt), [{"project_id": project.id, "text": f"p{i}"} for i in range(400)])
    s.commit()
    ids = list(s.scalars(sa.select(Prompt.id).where(Prompt.project_id == project.id)))
    held = {i for i in ids if is_heldout(i, fraction, seed)}
    assert held and len(held) < len(ids)
    for want, expected in ((True, held), (False, set(ids) - held)):
        condition = browse._heldout_condition(s, project, want)
        got = set(s.scalars(sa.select(Prompt.id).where(Prompt.project_id == project.id, condition)))
        assert got == expected


def test_a_project_that_holds_nothing_out(factory: Factory, session: Session) -> None:
    small = build_small(factory, heldout_fraction=0.0)
    assert listed(session, small, heldout="yes") == []
    assert listed(session, small, heldout="no") == small.ids(*small.mine)


def test_keyset_pages_of_fifty_both_ways_without_offset(
    factory: Factory, session: Session, db_url: str
) -> None:
    project = factory.project()
    s = factory.session
    s.execute(sa.insert(Prompt), [{"project_id": project.id, "text": f"p{i}"} for i in range(120)])
    s.commit()
    every = sorted(s.scalars(sa.select(Prompt.id)), reverse=True)
    statements: list[tuple[str, object]] = []
    sa.event.listen(session.get_bind(), "before_cursor_execute", record := (
        lambda conn, cursor, statement, parameters, *args: statements.append(
            (statement, parameters)
        )
    ))  # fmt: skip
    try:
        first = browse.list_prompts(session, project, PromptFilter())
        second = browse.list_prompts(session, project, PromptFilter(), after=first.older_after)
        third = browse.list_prompts(session, project, PromptFilter(), after=second.older_after)
        back = browse.list_prompts(session, project, PromptFilter(), before=third.newer_before)
        front = browse.list_prompts(session, project, PromptFilter(), before=back.newer_before)
    finally:
        sa.event.remove(session.get_bind(), "before_cursor_execute", record)
    assert [r.id for r in first.rows] == every[:50]
    assert (first.newer_before, first.older_after) == (None, every[49])
    assert (first.total, first.total_capped) == (120, False)
    assert [r.id for r in second.rows] == every[50:100]
    assert (second.newer_before, second.older_after) == (every[50], every[99])
    assert [r.id for r in third.rows] == every[100:]
    assert (third.newer_before, third.older_after) == (every[100], None)
    assert [r.id for r in back.rows] == every[50:100]
    assert (back.newer_before, back.older_after) == (every[50], every[99])
    assert [r.id for r in front.rows] == every[:50]
    assert (front.newer_before, front.older_after) == (None, every[49])
    # Never an OFFSET that skips rows (SQLite's dialect writes "OFFSET 0" after every LIMIT).
    offsets = [params[-1] for st, params in statements if "OFFSET" in st]  # type: ignore[index]
    assert statements and offsets == ([0] * len(offsets) if "sqlite" in db_url else [])


def test_the_count_stops_at_its_cap(factory: Factory, session: Session) -> None:
    project = factory.project()
    s = factory.session
    s.execute(sa.insert(Prompt), [{"project_id": project.id, "text": f"p{i}"} for i in range(30)])
    s.commit()
    assert browse.count_prompts(session, project, PromptFilter(), cap=10) == (10, True)
    assert browse.count_prompts(session, project, PromptFilter(), cap=30) == (30, False)
    capped = browse.PromptPage([], browse.COUNT_CAP, True, None, None)
    assert capped.total_label == "10,000+"


def test_filter_reads_and_writes_its_query_string() -> None:
    flt = PromptFilter.from_params({"q": "  cats ", "judged": "yes", "heldout": "sideways"})
    assert (flt.q, flt.judged, flt.heldout) == ("cats", "yes", "any")
    assert flt.params() == {"q": "cats", "judged": "yes"}
    assert flt.active and not PromptFilter().active


@pytest.mark.parametrize(
    ("choice", "strength", "label"),
    [("a", 2, "A much better"), ("a", 1, "A better"), ("b", 1, "B better"),
     ("b", 2, "B much better"), ("tie", None, "About the same"), ("both_bad", None, "Both bad")],
)  # fmt: skip
def test_choice_labels(choice: str, strength: int | None, label: str) -> None:
    assert browse.choice_label(choice, strength) == label


def test_prompt_detail(session: Session, small: Small) -> None:
    project = session.get(Project, small.project.id)
    assert project is not None
    detail = browse.prompt_detail(session, project, small.cats.id)
    assert detail.prompt.id == small.cats.id
    assert detail.turns == [{"role": "user", "content": "Alpha question about Cats?"}]
    assert [v.response.text for v in detail.responses] == ["answer 0", "answer 1"]
    assert [p.pair.id for p in detail.pairs] == [small.cats_pair.id]
    views = detail.pairs[0].judgments
    assert [(v.label, v.judgment.flags) for v in views] == [
        ("A much better", ["unsafe"]),
        ("About the same", []),
    ]
    assert views[0].rater_email == small.rater.email
    assert detail.judgment_count == 2
    assert detail.response_number(small.cats_pair.response_b_id) == 2
    imported = browse.prompt_detail(session, project, small.imported.id)
    assert imported.pairs[0].judgments[0].rater_email is None
    chat = browse.prompt_detail(session, project, small.chat.id)
    assert [t["role"] for t in chat.turns] == ["system", "user", "assistant", "user"]
    with pytest.raises(NotFound):
        browse.prompt_detail(session, project, small.foreign.id)


def test_mark_gold_in_the_project_only(session: Session, small: Small) -> None:
    project = session.get(Project, small.project.id)
    assert project is not None
    pair = browse.project_pair(session, project, small.cats_pair.id)
    browse.mark_gold(session, pair, "a")
    session.flush()
    correct = {
        choice: right
        for choice, right in session.execute(
            sa.select(Judgment.choice, Judgment.gold_correct).where(Judgment.pair_id == pair.id)
        )
    }
    assert correct == {"a": True, "tie": False}
    browse.mark_gold(session, pair, None)
    session.flush()
    assert pair.gold_choice is None
    with pytest.raises(InvalidInput):
        browse.mark_gold(session, pair, "left")
    foreign_pair = session.scalar(
        sa.select(ComparisonPair.id).where(ComparisonPair.prompt_id == small.foreign.id)
    )
    assert foreign_pair is not None
    with pytest.raises(NotFound):
        browse.project_pair(session, project, foreign_pair)
    session.rollback()
