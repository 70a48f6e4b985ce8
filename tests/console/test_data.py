"""The Data tab: the prompt browser, the prompt page with its gold form, the upload page; and
that the pages cost the same number of SQL statements whatever they show. On both backends."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from app.models import (
    AuditEvent,
    ComparisonPair,
    Judgment,
    ModelVersion,
    Project,
    Prompt,
    Response,
    Run,
    User,
)
from tests.conftest import Factory
from tests.console.conftest import Browser, counted_statements
from tests.services.test_browse import Small, build_small

BrowserFor = Callable[[User | None], Browser]


@pytest.fixture
def small(factory: Factory) -> Small:
    return build_small(factory)


@pytest.fixture
def admin(factory: Factory, browser_for: BrowserFor) -> Browser:
    return browser_for(factory.user("admin"))


def data_url(project: Project) -> str:
    return f"/admin/projects/{project.slug}/data"


def prompt_url(project: Project, prompt: Prompt | int) -> str:
    prompt_id = prompt if isinstance(prompt, int) else prompt.id
    return f"/admin/projects/{project.slug}/prompts/{prompt_id}"


def shown_ids(html: str, project: Project) -> list[int]:
    """The prompt ids of the browser's rows, in order (each row links its id twice)."""
    ids = re.findall(rf'href="/admin/projects/{project.slug}/prompts/(\d+)">\d+</a>', html)
    return [int(i) for i in ids]


def rows(factory: Factory, model: type[Any]) -> int:
    factory.session.rollback()
    return factory.count(model)


def gold_of(factory: Factory, pair_id: int) -> str | None:
    """The pair's gold answer as stored now (not as the test session last loaded it)."""
    factory.session.rollback()
    factory.session.expire_all()
    return factory.session.scalar(
        sa.select(ComparisonPair.gold_choice).where(ComparisonPair.id == pair_id)
    )


# --- the browser --------------------------------------------------------------------------------


def test_browser_lists_the_projects_prompts_with_their_figures(
    small: Small, admin: Browser
) -> None:
    page = admin.get(data_url(small.project))
    assert page.status_code == 200, page.text
    html = page.text
    assert shown_ids(html, small.project) == small.ids(*small.mine)
    assert "elsewhere" not in html  # the other project's prompt
    assert "Tell me about DOGS" in html  # a chat shows its first user message
    assert '<span class="badge flagged"' in html
    assert "<strong>5</strong> prompts" in html
    assert 'aria-current="page">Data</a>' in html  # the project's Data tab
    for source in ("api", "import:hh-rlhf", "upload"):
        assert f'<option value="{source}"' in html
    assert "Upload data" in html


def test_browser_filters_by_query_string(small: Small, admin: Browser) -> None:
    url = data_url(small.project)
    assert shown_ids(admin.get(f"{url}?flagged=yes").text, small.project) == [small.cats.id]
    assert shown_ids(admin.get(f"{url}?q=DOGS").text, small.project) == [small.chat.id]
    page = admin.get(f"{url}?judged=no&source=upload").text
    assert shown_ids(page, small.project) == [small.literal.id]
    assert "<strong>1</strong> prompt match" in page
    assert '<option value="upload" selected>' in page and "Clear</a>" in page
    nothing = admin.get(f"{url}?q=nowhere-to-be-found").text
    assert "No prompt matches these filters." in nothing


def test_htmx_swaps_only_the_results(small: Small, admin: Browser) -> None:
    url = f"{data_url(small.project)}?responses=no"
    swap = admin.client.get(url, headers={"HX-Request": "true", "HX-Target": "prompt-results"})
    assert swap.status_code == 200
    assert swap.text.lstrip().startswith('<div id="prompt-results"')
    assert shown_ids(swap.text, small.project) == [small.chat.id]
    # Going back in history asks htmx for the whole page again.
    restore = admin.client.get(
        url, headers={"HX-Request": "true", "HX-History-Restore-Request": "true"}
    )
    assert "<html" in restore.text and 'id="prompt-results"' in restore.text


def test_pager_links_keep_the_filter(factory: Factory, admin: Browser) -> None:
    project = factory.project()
    factory.session.execute(
        sa.insert(Prompt),
        [{"project_id": project.id, "text": f"p{i}", "source": "api"} for i in range(60)],
    )
    factory.session.commit()
    first = admin.get(f"{data_url(project)}?source=api").text
    assert len(shown_ids(first, project)) == 50
    older = re.search(r'href="([^"]+after=\d+[^"]*)"', first)
    assert older and "source=api" in older[1]
    second = admin.get(older[1].replace("&amp;", "&")).text
    assert len(shown_ids(second, project)) == 10
    assert "← Newer" in second and "Older →" not in second


def test_reviewer_reads_without_the_upload_button(
    small: Small, factory: Factory, browser_for: BrowserFor
) -> None:
    reviewer = browser_for(factory.user("reviewer"))
    html = reviewer.get(data_url(small.project)).text
    assert shown_ids(html, small.project) and "Upload data" not in html
    page = reviewer.get(prompt_url(small.project, small.cats)).text
    assert "A much better" in page and "gold-form" not in page


# --- one prompt ---------------------------------------------------------------------------------


def test_prompt_page_shows_responses_pairs_and_judgments(
    small: Small, factory: Factory, admin: Browser
) -> None:
    s = factory.session
    version = ModelVersion(project_id=small.project.id, kind="policy", version=3, name="ppo v3",
                           base_model="base", status="active")  # fmt: skip
    s.add(version)
    s.flush()
    s.add(
        Response(prompt_id=small.cats.id, text="**Cats** purr.\n\n<script>alert(1)</script>",
                 model_version_id=version.id, truncated=True,
                 generation_params={"temperature": 0.7, "seed": 3})
    )  # fmt: skip
    s.commit()
    page = admin.get(prompt_url(small.project, small.cats))
    assert page.status_code == 200, page.text
    html = page.text
    assert "Alpha question about Cats?" in html
    assert f'<a href="/admin/models/{version.id}">ppo v3</a>' in html
    assert "cut off at the token limit" in html
    assert "<strong>Cats</strong> purr." in html and "<script>alert" not in html
    assert "temperature" in html and "0.7" in html
    assert "A much better" in html and "About the same" in html
    assert "&lt;b&gt;bold&lt;/b&gt; claim" in html  # the rationale is text, not markup
    assert small.rater.email in html and "4.2 s" in html
    assert "helpfulness: A" in html and ">unsafe</span>" in html
    assert f'id="pair-{small.cats_pair.id}"' in html and "2 / 3 judgments" in html
    chat = admin.get(prompt_url(small.project, small.chat)).text
    assert chat.count('class="turn turn-user"') == 2 and "turn-system" in chat
    assert "No responses yet" in chat


def test_prompt_of_another_project_is_a_404_page(small: Small, admin: Browser) -> None:
    page = admin.get(prompt_url(small.project, small.foreign))
    assert page.status_code == 404 and "not in project" in page.text
    assert admin.get(prompt_url(small.project, 999_999)).status_code == 404


def test_admin_marks_a_pair_gold_and_unmarks_it(
    small: Small, factory: Factory, admin: Browser
) -> None:
    url = f"/admin/projects/{small.project.slug}/pairs/{small.cats_pair.id}/gold"
    done = admin.post(url, {"choice": "tie"})
    assert done.status_code == 303
    assert (
        done.headers["location"]
        == f"{prompt_url(small.project, small.cats)}#pair-{small.cats_pair.id}"
    )
    assert gold_of(factory, small.cats_pair.id) == "tie"
    correct = factory.session.scalars(
        sa.select(Judgment.gold_correct)
        .where(Judgment.pair_id == small.cats_pair.id)
        .order_by(Judgment.id)
    ).all()
    assert correct == [False, True]  # "a" was wrong, "tie" right
    page = admin.get(done.headers["location"]).text
    assert "Pair" in page and "is gold: About the same" in page and "gold ✓" in page
    assert factory.session.scalar(
        sa.select(sa.func.count()).select_from(AuditEvent).where(AuditEvent.action == "pair.gold")
    ) == 1  # fmt: skip
    factory.session.commit()
    assert admin.post(url, {"choice": ""}).status_code == 303
    assert gold_of(factory, small.cats_pair.id) is None


def test_gold_form_errors_and_other_projects_pairs(
    small: Small, factory: Factory, admin: Browser
) -> None:
    url = f"/admin/projects/{small.project.slug}/pairs/{small.cats_pair.id}/gold"
    empty = admin.post(url, {})
    assert empty.status_code == 422 and "choose the expected answer" in empty.text
    wrong = admin.post(url, {"choice": "left"})
    assert wrong.status_code == 422 and 'aria-invalid="true"' in wrong.text
    foreign = factory.session.scalar(
        sa.select(ComparisonPair.id).where(ComparisonPair.prompt_id == small.foreign.id)
    )
    other = admin.post(
        f"/admin/projects/{small.project.slug}/pairs/{foreign}/gold", {"choice": "a"}
    )
    assert other.status_code == 404
    factory.session.rollback()
    assert factory.session.scalars(sa.select(ComparisonPair.gold_choice)).all() == [None] * 4


# --- upload -------------------------------------------------------------------------------------


def upload_url(project: Project) -> str:
    return f"/admin/projects/{project.slug}/upload"


def send(
    browser: Browser, project: Project, content: bytes, filename: str, kind: str = "prompts",
    content_type: str = "application/octet-stream", **fields: str,
) -> Any:  # fmt: skip
    return browser.post(
        upload_url(project),
        {"kind": kind, **fields},
        files={"file": (filename, content, content_type)},
    )


def jsonl(*records: Any) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def test_upload_page_offers_both_kinds(factory: Factory, admin: Browser) -> None:
    project = factory.project()
    page = admin.get(upload_url(project))
    assert page.status_code == 200
    assert 'value="prompts" checked' in page.text and 'value="preferences"' in page.text
    assert 'data-max-bytes="65536"' in page.text and 'enctype="multipart/form-data"' in page.text


def test_uploading_prompts_stores_them_and_queues_generation(
    factory: Factory, admin: Browser
) -> None:
    project = factory.project(overlap=2)
    content = jsonl(
        {"prompt": "First question", "external_id": "a1"},
        {"prompt": "Second, answered", "responses": ["yes", "no", {"text": "maybe", "model": "m"}]},
    )
    done = send(admin, project, content, "batch.jsonl")
    assert done.status_code == 303, done.text
    assert done.headers["location"] == data_url(project)
    page = admin.get(done.headers["location"]).text
    run_id = factory.session.scalar(sa.select(Run.id).where(Run.kind == "generate"))
    assert run_id is not None
    assert (
        "batch.jsonl: 2 prompts created, 0 duplicates skipped, 3 responses, 3 pairs."
        f" Generation run {run_id} queued."
    ) in page
    assert "First question" in page and "Second, answered" in page
    factory.session.rollback()
    sources = factory.session.scalars(sa.select(Prompt.source)).all()
    assert sources == ["console", "console"]
    assert rows(factory, ComparisonPair) == 3
    again = send(admin, project, content, "batch.jsonl")
    assert "1 prompts created, 1 duplicates skipped" in admin.get(again.headers["location"]).text


def test_upload_csv(factory: Factory, admin: Browser) -> None:
    project = factory.project(auto_generate=False)
    content = b"prompt,external_id,response_1,response_2\nWhat is RLHF?,q1,An answer,Another\n"
    done = send(admin, project, content, "sheet.csv", content_type="text/csv")
    assert done.status_code == 303, done.text
    page = admin.get(done.headers["location"]).text
    assert "sheet.csv: 1 prompts created, 0 duplicates skipped, 2 responses, 1 pairs." in page
    assert "Generation run" not in page


def test_a_bad_line_stores_nothing_and_is_shown_next_to_the_file(
    factory: Factory, admin: Browser
) -> None:
    project = factory.project()
    content = b'{"prompt": "fine"}\n{"prompt": "also fine"}\n{"text": "wrong key"}\n{"prompt": 3}\n'
    page = send(admin, project, content, "broken.jsonl")
    assert page.status_code == 422
    assert '<strong class="problem-file">broken.jsonl</strong>' in page.text
    assert "<li>line 3, prompt: missing" in page.text
    assert "<li>line 3, text: unknown field" in page.text
    assert "<li>line 4, prompt: must be a string, got number</li>" in page.text
    assert rows(factory, Prompt) == 0 and rows(factory, Run) == 0


def test_upload_limits_and_types(factory: Factory, admin: Browser) -> None:
    project = factory.project()
    big = send(admin, project, b'{"prompt": "x"}\n' * 5000, "big.jsonl")  # 80 KB > 64 KB
    assert big.status_code == 413
    assert "big.jsonl</strong>: The file is 78 KB; the limit is 64 KB." in big.text
    odd = send(admin, project, b"hello", "notes.txt", content_type="text/plain")
    assert odd.status_code == 415 and "upload JSONL (.jsonl) or CSV (.csv)" in odd.text
    many = send(admin, project, jsonl(*({"prompt": f"p{i}"} for i in range(101))), "many.jsonl")
    assert many.status_code == 422 and "more than 100 records" in many.text
    assert rows(factory, Prompt) == 0


def test_an_empty_form_is_refused_at_its_fields(factory: Factory, admin: Browser) -> None:
    project = factory.project()
    page = admin.post(upload_url(project), {})
    assert page.status_code == 422
    assert "choose a file to upload" in page.text and "choose what the file holds" in page.text


def hh(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    return {
        "chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
        "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}",
    }


def test_importing_preference_pairs(factory: Factory, admin: Browser) -> None:
    project = factory.project()
    content = jsonl(
        hh("Hi", "Hello!", "Go away."),
        hh("Hi", "Same", "Same"),
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    )
    done = send(admin, project, gzip.compress(content), "prefs.jsonl.gz", kind="preferences",
                format="auto", source="hh-test")  # fmt: skip
    assert done.status_code == 303, done.text
    page = admin.get(done.headers["location"]).text
    assert (
        "prefs.jsonl.gz: 2 pairs imported with their judgments (2 new prompts), 0 duplicates"
        " skipped. 1 lines skipped (line 2: chosen and rejected are identical)."
    ) in page
    factory.session.rollback()
    assert factory.session.scalars(sa.select(Judgment.source)).all() == ["import:hh-test"] * 2
    assert rows(factory, Run) == 0


def test_import_errors_store_nothing(factory: Factory, admin: Browser) -> None:
    project = factory.project()
    bad = send(admin, project, jsonl(hh("Hi", "a", "b"), {"chosen": "x"}), "prefs.jsonl",
               kind="preferences")  # fmt: skip
    assert bad.status_code == 422 and "<li>line 2, rejected: missing</li>" in bad.text
    named = send(admin, project, jsonl(hh("Hi", "a", "b")), "prefs.jsonl", kind="preferences",
                 source="Not A Source!")  # fmt: skip
    assert named.status_code == 422 and "must be 1-41 lowercase letters" in named.text
    assert rows(factory, Prompt) == 0 and rows(factory, Judgment) == 0


# --- statements per page ------------------------------------------------------------------------


def grow(factory: Factory, project: Project, prompts: int, raters: list[User]) -> Prompt:
    """`prompts` prompts with 3 responses, 3 pairs and a judgment per rater per pair (one in
    five flagged); returns the last, which has the most of everything on its page."""
    s = factory.session
    last: Prompt | None = None
    for n in range(prompts):
        last = Prompt(project_id=project.id, text=f"question {n}", external_id=f"g{n}",
                      source="upload" if n % 2 else "api")  # fmt: skip
        s.add(last)
        s.flush()
        gold = n % 3 == 0
        answers = [Response(prompt_id=last.id, text=f"answer {k}", model_name="m",
                            truncated=k == 2) for k in range(3)]  # fmt: skip
        s.add_all(answers)
        s.flush()
        for i, (a, b) in enumerate([(0, 1), (0, 2), (1, 2)]):
            pair = ComparisonPair(
                project_id=project.id, prompt_id=last.id, response_a_id=answers[a].id,
                response_b_id=answers[b].id, judgment_count=len(raters),
                gold_choice="a" if gold else None,
            )  # fmt: skip
            s.add(pair)
            s.flush()
            s.add_all(
                Judgment(project_id=project.id, pair_id=pair.id, rater_id=r.id, choice="b",
                         strength=1, flags=["broken"] if (n + i + j) % 5 == 0 else [],
                         rationale="why", aspects={"honesty": "tie"})
                for j, r in enumerate(raters)
            )  # fmt: skip
    s.commit()
    assert last is not None
    return last


def test_pages_cost_the_same_statements_for_3_prompts_as_for_30(
    factory: Factory, admin: Browser, app: FastAPI
) -> None:
    raters = [factory.user() for _ in range(4)]
    few, many = factory.project("few"), factory.project("many")
    few_prompt = grow(factory, few, 3, raters[:1])
    many_prompt = grow(factory, many, 30, raters)

    def statements(url: str) -> int:
        admin.get(url)  # warm: the first request of a session loads what later ones reuse
        with counted_statements(app.state.engine) as seen:
            page = admin.get(url)
        assert page.status_code == 200, page.text
        return len(seen)

    for query in ("", "?flagged=yes", "?judged=yes&heldout=no", "?q=question"):
        assert statements(data_url(few) + query) == statements(data_url(many) + query), query
    assert statements(prompt_url(few, few_prompt)) == statements(prompt_url(many, many_prompt))
