"""The Training tab: the runs list, a launch form with a field error, a running run's page with
its charts and log, a finished reward run, and an evaluation's sample table."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from app.models import Run, RunMetric, User, utcnow
from shots import Shot


def seed(session: Any, ids: dict[str, Any]) -> None:
    """Runs of every kind and status around the seeded PPO and reward runs, with who started
    them; an evaluation with samples; a longer log for the running PPO run."""
    ppo = session.get(Run, ids["run"])
    reward = session.get(Run, ids["reward_run"])
    admin = session.get(User, ids["admin"])
    now = utcnow()
    ppo.created_by_id = admin.id
    ppo.trigger = "console"
    ppo.attempts = 1
    ppo.config = {
        "total_steps": 20, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2,
        "learning_rate": None, "kl_coef": 0.05, "max_new_tokens": 64,
        "reward_model_id": ids["reward"],
    }  # fmt: skip
    ppo.log_tail = "\n".join(
        [
            "10:20:01 queued (console)",
            "10:20:03 claimed by verdict@worker-1 (attempt 1)",
            "10:20:09 PPO from policy v1 against reward model v1: 18 training prompts (6 held"
            " out), 20 steps of 8",
            *(f"10:{21 + i:02d}:10 step {i}/20 kl {0.4 * i:.2f} score {0.1 + 0.05 * i:.2f}"
              for i in range(1, 8)),
            "10:25:10 step 5 sample (score 0.350): 'Use reversed(xs) or xs[::-1] <- both work'",
        ]
    )  # fmt: skip
    project_id = ppo.project_id
    rows = [
        Run(project_id=project_id, kind="generate", status="succeeded", trigger="upload",
            progress_done=24, progress_total=24, created_at=now - timedelta(hours=6),
            started_at=now - timedelta(hours=6), finished_at=now - timedelta(hours=5, minutes=52)),
        Run(project_id=project_id, kind="dpo", status="cancelled", trigger="console",
            created_by_id=admin.id, progress_done=3, progress_total=30,
            created_at=now - timedelta(hours=4), started_at=now - timedelta(hours=4),
            finished_at=now - timedelta(hours=3, minutes=57)),
        Run(project_id=project_id, kind="generate", status="queued", trigger="auto",
            created_at=now - timedelta(minutes=1), log_tail="10:29:00 queued (auto)"),
    ]  # fmt: skip
    session.add_all(rows)
    session.flush()
    evaluation = Run(
        project_id=project_id, kind="evaluate", status="succeeded", trigger="auto",
        parent_run_id=reward.id, config={"model_version_id": ids["policy"], "max_prompts": 32},
        progress_done=6, progress_total=6, created_at=now - timedelta(hours=1, minutes=6),
        started_at=now - timedelta(hours=1, minutes=5),
        finished_at=now - timedelta(hours=1), worker="verdict@worker-1", attempts=1,
        log_tail="10:00:00 evaluating policy v1 against v0 on 6 held-out prompts\n"
                 "10:04:40 policy v1: score gain 0.21 >= 0.05, KL 2.4 <= 10 -> rule passed",
        result={
            "model_version_id": ids["policy"], "rule_passed": True,
            "rule": "score gain 0.21 >= 0.05, KL 2.4 <= 10",
            "evaluation": {"mean_score": 0.61, "parent_mean_score": 0.40, "score_gain": 0.21,
                           "kl_to_parent": 2.4},
            "samples": [
                {"prompt": "How do I reverse a list in Python?",
                 "response": "Use `reversed(xs)` for an iterator, or `xs[::-1]` for a new list.",
                 "score": 0.82, "parent_response": "You can reverse it.", "parent_score": 0.11},
                {"prompt": "Name three prime numbers.", "response": "2, 3 and 5.",
                 "score": 0.64, "parent_response": "1, 2, 3 <b>are</b> primes",
                 "parent_score": 0.02},
            ],
        },
    )  # fmt: skip
    session.add(evaluation)
    session.flush()
    session.add_all(
        RunMetric(run_id=evaluation.id, step=step, name="eval/score", value=0.4 + 0.04 * step)
        for step in range(6)
    )
    ppo.parent_run_id = reward.id
    ids["evaluation_run"] = evaluation.id
    # The snapshot's 26 judgments of 15 pairs split by prompt; 4 of 5 examples right, 3 pairs.
    reward.result = {
        "model_version_id": ids["reward"], "snapshot_id": reward.snapshot_id, "active": True,
        "metrics": {
            "loss/val": 0.561, "accuracy/val": 0.8, "train_examples": 21, "train_pairs": 12,
            "val_examples": 5, "val_pairs": 3, "best_val_accuracy": 0.8,
            "best_val_accuracy_pairs": 3, "best_val_accuracy_ci95": [0.2877, 0.9754],
            "train_seconds": 583.2,
        },
        "policy_run_id": ppo.id,
    }  # fmt: skip


def ppo_field_error(page: Any) -> None:
    """A value the browser lets through and the service refuses at its field."""
    page.fill("#f-mini_batch_size", "3")
    page.click("button.primary[type=submit]")
    page.wait_for_load_state("networkidle")
    page.locator("#f-mini_batch_size").scroll_into_view_if_needed()


def charts_drawn(page: Any) -> None:
    page.wait_for_selector("#run-charts .chart canvas")
    page.wait_for_timeout(300)


PAGES = [
    Shot("console-training-runs", lambda ids: f"/admin/projects/{ids['slug']}/training"),
    Shot(
        "console-training-launch-ppo",
        lambda ids: f"/admin/projects/{ids['slug']}/training/new/ppo",
        before=ppo_field_error,
    ),
    Shot(
        "console-training-launch-rloo",
        lambda ids: f"/admin/projects/{ids['slug']}/training/new/rloo",
    ),
    Shot(
        "console-training-run-running", lambda ids: f"/admin/runs/{ids['run']}", before=charts_drawn
    ),
    Shot(
        "console-training-run-reward",
        lambda ids: f"/admin/runs/{ids['reward_run']}",
        before=charts_drawn,
    ),
    Shot(
        "console-training-run-evaluation",
        lambda ids: f"/admin/runs/{ids['evaluation_run']}",
        before=charts_drawn,
    ),
]
