"""The closed loop end to end, through the REST API, with tiny models, a real worker and beat:

    upload prompts → generation by the base policy → a rater judges (API) → the periodic trigger
    queues a reward run → PPO run → evaluate run → automatic promotion → generation by the new
    version, with version_eval pairs that feed the leaderboard.

Nobody presses a button after the upload and the judgments: every later step is a run with
trigger `auto` whose `parent_run_id` names the run that caused it.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.services import users
from tests.conftest import bearer
from tests.workers.conftest import CeleryProcess, Stack, wait_for

pytestmark = pytest.mark.worker

N_PROMPTS = 12
SETTINGS: dict[str, Any] = {
    "overlap": 1,
    "gold_rate": 0.0,
    "responses_per_prompt": 2,
    "max_new_tokens": 8,
    "auto_mode": True,
    "reward_retrain_threshold": N_PROMPTS,
    # Tiny random models learn little; the rule's thresholds are tested in the service tests.
    # Here the loop must carry a candidate through every step.
    "min_reward_accuracy": 0.0,
    "promote_min_score_gain": -1e9,
    "promote_max_kl": 1e9,
    "version_eval_rate": 1.0,
    "heldout_fraction": 0.25,
    "loop_algorithm": "ppo",  # the loop with a value model; the others: test_critic_free_worker
    "loop_ppo_config": {
        "total_steps": 2,
        "batch_size": 4,
        "mini_batch_size": 2,
        "ppo_epochs": 1,
        "learning_rate": 1e-3,
    },  # fmt: skip
    "loop_evaluate_config": {"max_prompts": 3, "batch_size": 3},
}


def judge_everything(client: TestClient, slug: str, headers: dict[str, str]) -> int:
    """The rater prefers the shorter answer (the first one when equally long)."""
    done = 0
    while True:
        response = client.get(f"/api/v1/projects/{slug}/assignments/next", headers=headers)
        if response.status_code == 204:
            return done
        assert response.status_code == 200, response.text
        item = response.json()
        a, b = item["response_a"]["text"], item["response_b"]["text"]
        verdict = client.post(
            f"/api/v1/assignments/{item['id']}/judgment",
            json={"choice": "a" if len(a) <= len(b) else "b", "strength": 1},
            headers=headers,
        )
        assert verdict.status_code == 200, verdict.text
        done += 1


def test_judgments_to_a_promoted_policy_that_writes_the_next_round(live: Stack) -> None:
    with live.session() as s:
        admin = users.create_user(s, "loop-admin@example.com", "long enough pw", "admin")
        rater = users.create_user(s, "loop-rater@example.com", "long enough pw", "rater")
        admin_h = bearer(users.create_token(s, admin, "t").secret)
        rater_h = bearer(users.create_token(s, rater, "t").secret)
    app = create_app(live.settings)
    slug = "loop"

    def runs_of(client: TestClient, kind: str) -> list[dict[str, Any]]:
        response = client.get(f"/api/v1/projects/{slug}/runs?kind={kind}", headers=admin_h)
        assert response.status_code == 200, response.text
        return list(reversed(response.json()))  # oldest first

    def finished(client: TestClient, run_id: int, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/api/v1/runs/{run_id}", headers=admin_h).json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        body: dict[str, Any] = wait_for(check, timeout, f"run {run_id} to finish", interval=0.5)
        assert body["status"] == "succeeded", (body["error"], body["log_tail"])
        return body

    with TestClient(app) as client:
        created = client.post(
            "/api/v1/projects",
            json={"slug": slug, "name": "Loop",
                  "settings": {**SETTINGS, "base_policy": str(live.model_dir)}},
            headers=admin_h,
        )  # fmt: skip
        assert created.status_code == 201, created.text
        upload = client.post(
            f"/api/v1/projects/{slug}/prompts",
            json={"prompts": [{"prompt": f"What is {i} plus {i}?"} for i in range(N_PROMPTS)]},
            headers=admin_h,
        )
        assert upload.status_code == 200, upload.text
        first_generation = finished(client, upload.json()["generation_run_id"])
        assert first_generation["result"]["pairs"] == N_PROMPTS
        assert judge_everything(client, slug, rater_h) == N_PROMPTS

        # From here on nothing is asked for: beat notices the judgments and the loop runs.
        beat = CeleryProcess(
            ["beat", f"--schedule={live.var_dir / 'loop-beat'}", "--loglevel=info"],
            {**live.env, "VERDICT_REWARD_TRIGGER_INTERVAL_S": "1"},
            live.var_dir / "loop-beat.log",
        )
        live.extra.append(beat)
        reward_run = finished(
            client, wait_for(lambda: runs_of(client, "reward"), 60, "a reward run")[0]["id"]
        )
        assert reward_run["trigger"] == "auto"
        ppo_id = reward_run["result"]["policy_run_id"]
        assert ppo_id is not None, reward_run["log_tail"]
        beat.stop()  # the next round's judgments below must not start another round
        ppo = finished(client, ppo_id)
        evaluate = finished(client, ppo["result"]["evaluate_run_id"])
        assert evaluate["result"]["rule_passed"] and evaluate["result"]["promoted"]
        generation = finished(client, evaluate["result"]["generation_run_id"])
        for run, parent in ((ppo, reward_run), (evaluate, ppo), (generation, evaluate)):
            assert run["trigger"] == "auto"
            assert run["parent_run_id"] == parent["id"]  # the lineage, through the API
        assert len(runs_of(client, "ppo")) == len(runs_of(client, "evaluate")) == 1

        # Lineage and metrics of the promoted version, through the API.
        version_id = ppo["result"]["model_version_id"]
        model = client.get(f"/api/v1/models/{version_id}", headers=admin_h).json()
        assert (model["version"], model["status"]) == (1, "active")
        assert model["run"]["id"] == ppo["id"] and model["parent"]["version"] == 0
        assert model["reward_model"]["id"] == reward_run["result"]["model_version_id"]
        assert model["snapshot_id"] == reward_run["result"]["snapshot_id"]
        assert {"score_gain", "kl_to_parent", "evaluation", "train"} <= set(model["metrics"])
        assert model["metrics"]["promotion_rule"]["passed"] is True
        low, high = model["metrics"]["score_gain_interval"]  # on the 3 held-out prompts
        assert low <= model["metrics"]["score_gain"] <= high
        assert model["metrics"]["evaluation"]["confidence"] == 0.95
        assert "interval" in model["metrics"]["promotion_rule"]["reason"]
        models = client.get(f"/api/v1/projects/{slug}/models?kind=policy", headers=admin_h).json()
        assert [(m["version"], m["status"]) for m in models] == [(0, "archived"), (1, "active")]

        # The new version wrote the next round, with new-vs-previous pairs for human evaluation.
        assert generation["result"]["policy_version"] == 1
        assert generation["result"]["responses"] == 2 * N_PROMPTS
        assert generation["result"]["version_eval_pairs"] == N_PROMPTS
        assert judge_everything(client, slug, rater_h) == 2 * N_PROMPTS
        board = client.get(f"/api/v1/projects/{slug}/leaderboard", headers=admin_h).json()
        assert board["games"] == N_PROMPTS
        rated = {row["version_id"] for row in board["versions"]}
        assert rated == {version_id, model["parent"]["id"]}
    app.state.engine.dispose()
