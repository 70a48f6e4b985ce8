"""A best-of-K generation run on a real worker (both brokers, see conftest): cancelled part-way,
it has stored whole prompts only, each with its one pair; a rerun finishes the rest."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa

from app.core.db import unit_of_work
from app.models import ComparisonPair, Response
from app.services import projects, registry, runs
from tests.ml.test_best_of_scoring import save_tiny_reward_model
from tests.workers.conftest import Stack, wait_for

pytestmark = pytest.mark.worker

FINISHED = ("succeeded", "failed", "cancelled")


def test_a_cancelled_best_of_k_run_keeps_whole_pairs_and_a_rerun_completes_it(live: Stack) -> None:
    n_prompts = 200  # far more than it gets through before the cancel, on a fast machine too
    live.project(n_prompts=n_prompts, slug="bestof", max_new_tokens=24, best_of_k=4)
    rm_dir = save_tiny_reward_model(live.var_dir / "tiny-reward")
    with live.session() as s:
        project = projects.get_project(s, "bestof")
        version = registry.create_version(
            s, project, "reward", base_model=str(rm_dir), artifact_path=str(rm_dir)
        )
        registry.activate(s, version)
    with live.session() as s:
        project = projects.get_project(s, "bestof")
        run = runs.create_run(s, project, "generate", {"batch_size": 8}, settings=live.settings)
    wait_for(lambda: live.run_row(run.id).progress_done >= 2, 120, "the run to progress")
    with unit_of_work(live.database_url) as s:
        runs.cancel_run(s, runs.get_run(s, run.id), settings=live.settings)
    row = live.wait_status(run.id, FINISHED, timeout=60)
    assert row.status == "cancelled" and row.error is None

    def stored() -> tuple[list[Response], list[ComparisonPair]]:
        with live.session() as s:
            responses = list(s.scalars(sa.select(Response).order_by(Response.prompt_id)))
            pairs = list(s.scalars(sa.select(ComparisonPair)))
        return responses, pairs

    responses, pairs = stored()
    assert 0 < len(responses) < 2 * n_prompts
    by_prompt = {p: list(g) for p, g in itertools.groupby(responses, key=lambda r: r.prompt_id)}
    assert all(len(group) == 2 for group in by_prompt.values())
    assert len(pairs) == len(by_prompt) and {p.prompt_id for p in pairs} == set(by_prompt)
    assert all(r.generation_params["best_of"]["k"] == 4 for r in responses)

    # The rerun answers the prompts the cancelled one did not reach, and no other.
    with live.session() as s:
        project = projects.get_project(s, "bestof")
        rerun = runs.create_run(
            s, project, "generate", {"batch_size": 8, "limit": 3}, settings=live.settings
        )
    done = live.wait_status(rerun.id, FINISHED, timeout=120)
    assert done.status == "succeeded", done.error or done.log_tail
    assert done.result["responses"] == 6 and done.result["best_of_k"] == 4
    after, _ = stored()
    assert not {r.prompt_id for r in after if r.generation_params["run_id"] == rerun.id} & set(
        by_prompt
    )
