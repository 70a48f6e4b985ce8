"""The Models tab: the versions with the human leaderboard, a policy version's page (lineage,
metrics, side-by-side samples), and the playground following a finished `sample` run."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import (
    ComparisonPair,
    Judgment,
    ModelVersion,
    Prompt,
    Response,
    Run,
    User,
    utcnow,
)
from shots import Shot

SAMPLES = [
    (
        "How do I reverse a list in Python?",
        "Use slicing, which returns a new list:\n\n```python\nitems[::-1]\n```\n\n"
        "or `items.reverse()` to reverse it in place.",
        0.82,
        "You can reverse a list by using a loop that goes over the list backwards and appends"
        " each item to a new list.",
        0.35,
    ),
    (
        "Explain KL divergence to a new engineer.",
        "KL divergence measures how much one probability distribution **differs** from"
        " another: the extra bits you pay, on average, for coding samples of *P* with a code"
        " built for *Q*. It is not symmetric.",
        0.64,
        "KL divergence is a distance between distributions.",
        0.12,
    ),
    (
        "Write a haiku about gradient descent.",
        "Down the loss we roll —\nsmall steps where the slope is steep,\nrest in the valley.",
        0.51,
        "Gradient descent\ngoes down the hill step by step\nuntil it is done.",
        0.47,
    ),
]


def seed(session: Session, ids: dict[str, Any]) -> None:
    """A candidate policy v2 trained by PPO against reward v1 and evaluated (with samples), an
    older reward model, human version_eval judgments of v0, v1 and v2, and a finished sample
    run for the playground."""
    project_id = session.get(ModelVersion, ids["policy"]).project_id  # type: ignore[union-attr]
    v1 = session.get(ModelVersion, ids["policy"])
    reward = session.get(ModelVersion, ids["reward"])
    assert v1 is not None and reward is not None and v1.parent_id is not None
    base = session.get(ModelVersion, v1.parent_id)
    assert base is not None
    now = utcnow()
    # Created in the order the loop made them (the shared seed stamps every row "now").
    base.created_at = now - timedelta(days=2, hours=1)
    reward.created_at = now - timedelta(hours=2, minutes=50)
    v1.created_at = now - timedelta(hours=1, minutes=20)
    session.add(
        ModelVersion(
            project_id=project_id, kind="reward", version=0, name="reward v0",
            base_model="smollm2", artifact_path="/var/artifacts/r0", status="archived",
            metrics={"accuracy/val": 0.61, "best_val_accuracy": 0.63, "val_pairs": 6,
                     "train_pairs": 20}, created_at=now - timedelta(days=1),
            promoted_at=now - timedelta(days=1),
        )
    )  # fmt: skip
    reward.metrics = {
        "loss/train": 0.512, "accuracy/train": 0.79, "loss/val": 0.561, "accuracy/val": 0.72,
        "best_val_accuracy": 0.74, "train_pairs": 48, "val_pairs": 12, "train_seconds": 583.2,
    }  # fmt: skip
    v1.metrics = {
        **v1.metrics,
        "promotion_rule": {"passed": True, "reason": "score gain +0.2100 >= 0 and KL 2.4000 <= 10"},
    }
    snapshot_id = reward.snapshot_id
    ppo = Run(
        project_id=project_id, kind="ppo", status="succeeded", trigger="auto",
        config={"total_steps": 20}, progress_done=20, progress_total=20,
        started_at=now - timedelta(minutes=50), finished_at=now - timedelta(minutes=31),
    )  # fmt: skip
    evaluate = Run(
        project_id=project_id, kind="evaluate", status="succeeded", trigger="auto",
        config={"max_prompts": 16}, progress_done=16, progress_total=16,
        started_at=now - timedelta(minutes=30), finished_at=now - timedelta(minutes=24),
    )  # fmt: skip
    session.add_all([ppo, evaluate])
    session.flush()
    evaluate.parent_run_id = ppo.id
    samples = [
        {"prompt": p, "response": r, "score": s, "parent_response": pr, "parent_score": ps}
        for p, r, s, pr, ps in SAMPLES
    ]
    v2 = ModelVersion(
        project_id=project_id, kind="policy", version=2, name="ppo v2", base_model="smollm2",
        artifact_path="/var/artifacts/p2", status="candidate", parent_id=v1.id,
        reward_model_id=reward.id, snapshot_id=snapshot_id, run_id=ppo.id,
        created_at=now - timedelta(minutes=31),
        metrics={
            "heldout": {"fraction": 0.2, "seed": 0},
            "train": {"objective/kl": 2.91, "objective/scores": 0.58, "loss/policy": -0.012,
                      "loss/value": 0.083, "policy/response_length": 41.5, "lr": 0.0002},
            "steps": 20, "train_prompts": 19, "train_seconds": 1132.4, "algorithm": "ppo",
            "score_gain": 0.183, "kl_to_parent": 3.12, "mean_score": 0.66,
            "evaluation": {
                "mean_score": 0.66, "parent_mean_score": 0.477, "score_gain": 0.183,
                "kl_to_parent": 3.12, "eos_rate": 0.94, "mean_length": 38.2, "num_prompts": 5,
                "reward_model_id": reward.id, "parent_id": v1.id, "run_id": evaluate.id,
                "heldout_prompt_ids": [3, 8, 11, 17, 22], "samples": samples,
            },
            "promotion_rule": {
                "passed": True, "reason": "score gain +0.1830 >= 0 and KL 3.1200 <= 10",
            },
        },
    )  # fmt: skip
    session.add(v2)
    session.flush()
    ids["candidate"] = v2.id

    # Human comparisons of new vs previous versions: v1 beats v0 clearly, v2 edges v1.
    raters = list(session.scalars(select(User).where(User.role == "rater")))
    prompts = list(session.scalars(select(Prompt).where(Prompt.project_id == project_id)))
    rng = random.Random(3)
    for new, old, p_new, n in ((v1, base, 0.72, 60), (v2, v1, 0.58, 36)):
        for k in range(n):
            prompt = prompts[k % len(prompts)]
            a = Response(prompt_id=prompt.id, text=f"v{new.version} answer {k}",
                         model_version_id=new.id)  # fmt: skip
            b = Response(prompt_id=prompt.id, text=f"v{old.version} answer {k}",
                         model_version_id=old.id)  # fmt: skip
            session.add_all([a, b])
            session.flush()
            pair = ComparisonPair(
                project_id=project_id, prompt_id=prompt.id, response_a_id=a.id,
                response_b_id=b.id, required_judgments=1, judgment_count=1, kind="version_eval",
            )  # fmt: skip
            session.add(pair)
            session.flush()
            draw = rng.random()
            choice = "tie" if draw > 0.92 else "a" if draw < p_new * 0.92 else "b"
            session.add(
                Judgment(
                    project_id=project_id, pair_id=pair.id, rater_id=raters[k % len(raters)].id,
                    choice=choice, strength=None if choice == "tie" else 1 + k % 2,
                )
            )  # fmt: skip

    # A playground answer: a finished `sample` run of the active policy.
    sample = Run(
        project_id=project_id, kind="sample", status="succeeded", trigger="console",
        config={"prompt": "Give me two tips for writing clear commit messages.",
                "messages": None, "num_responses": 2, "max_new_tokens": 64, "temperature": 0.7,
                "top_p": 0.9, "seed": 0, "model_version_id": v1.id},
        result={"model_version_id": v1.id, "responses": [
            {"text": "1. **Say why**, not only what.\n2. Keep the subject line under 50"
                     " characters.", "truncated": False, "tokens": 21},
            {"text": "Write the subject in the imperative mood (\"Add\", not \"Added\"), and"
                     " explain in the body what the change does and why it was needed, for"
                     " example which bug it fixes and how", "truncated": True, "tokens": 64},
        ]},
        progress_done=1, progress_total=1, started_at=now - timedelta(seconds=9),
        finished_at=now - timedelta(seconds=4),
    )  # fmt: skip
    session.add(sample)
    session.flush()
    ids["sample_run"] = sample.id


PAGES = [
    Shot("console-models-versions", lambda ids: f"/admin/projects/{ids['slug']}/models"),
    Shot("console-models-version", lambda ids: f"/admin/models/{ids['candidate']}"),
    Shot(
        "console-models-playground",
        lambda ids: f"/admin/projects/{ids['slug']}/playground?generate={ids['sample_run']}",
    ),
]
