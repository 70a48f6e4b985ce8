"""The one registry of run kinds: `RUN_KINDS`. Each entry names its config type (the knob
definitions in this package), its worker-side handler (a function in `app.jobs`, imported only by
workers), the service function that checks a config against the database, the queue it runs on
and whether a crashed run can resume. The database's CHECK constraint on `runs.kind`, the API's
accepted kinds and schemas, the CLI's `runs start` choices and the console's launch menu derive
from it (`tests/unit/test_kinds.py` checks that they agree).

Adding a kind (as `rloo` and `grpo` were): an entry here, its knobs module here, its job in
`app/jobs/`, its trainer in `app/ml/`, a migration for the CHECK constraint, and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.kinds.critic_free import GRPORunConfig, RLOORunConfig
from app.kinds.dpo import DPORunConfig
from app.kinds.evaluate import EvaluateRunConfig
from app.kinds.generate import GenerateRunConfig
from app.kinds.interactive import SampleRunConfig, ScoreRunConfig
from app.kinds.knobs import Knobs
from app.kinds.ppo import PPORunConfig
from app.kinds.queues import GPU_QUEUE
from app.kinds.reward import RewardRunConfig


@dataclass(frozen=True)
class RunKind:
    """How one kind of run is configured, checked, queued and executed."""

    name: str
    title: str
    summary: str
    config: type[Knobs]
    # "module:function" strings, so that this registry stays importable without torch (and by
    # the database models): `handler` is imported by the worker's runner only, `validate` by
    # the services when a run is created.
    handler: str
    validate: str | None
    queue: str = GPU_QUEUE
    # True when running the handler again after a crash continues the work (nothing is done
    # twice): the reaper then requeues a dead run instead of failing it.
    resumable: bool = False
    # Offered by `POST /projects/{slug}/runs`, `verdict runs start` and the console; the other
    # kinds are started by the API calls they serve (scoring, the playground).
    launchable: bool = True


RUN_KINDS: dict[str, RunKind] = {
    kind.name: kind
    for kind in (
        RunKind(
            "generate",
            "Generation",
            "the active policy answers prompts K times; the answers become comparison pairs"
            " (best-of-K: the reward model's top answer and a contrasting one)",
            GenerateRunConfig,
            handler="app.jobs.generate:run",
            validate="app.services.generation:validate_generate_config",
            resumable=True,
        ),
        RunKind(
            "reward",
            "Reward model",
            "snapshot the judgments and train a Bradley-Terry reward model on them",
            RewardRunConfig,
            handler="app.jobs.reward:run",
            validate="app.services.reward_runs:validate_reward_config",
            resumable=True,
        ),
        RunKind(
            "ppo",
            "PPO",
            "fine-tune the active policy against a reward model, held near it by a KL penalty",
            PPORunConfig,
            handler="app.jobs.ppo:run",
            validate="app.services.policy_runs:validate_rl_config",
            resumable=True,
        ),
        RunKind(
            "rloo",
            "RLOO",
            "fine-tune the active policy against a reward model, K answers per prompt, each"
            " against the mean of the others (no value model)",
            RLOORunConfig,
            handler="app.jobs.critic_free:rloo",
            validate="app.services.policy_runs:validate_rl_config",
            resumable=True,
        ),
        RunKind(
            "grpo",
            "GRPO",
            "fine-tune the active policy against a reward model, K answers per prompt,"
            " normalised within their group (no value model)",
            GRPORunConfig,
            handler="app.jobs.critic_free:grpo",
            validate="app.services.policy_runs:validate_rl_config",
            resumable=True,
        ),
        RunKind(
            "dpo",
            "DPO",
            "fine-tune the active policy directly on the judged pairs",
            DPORunConfig,
            handler="app.jobs.dpo:run",
            validate="app.services.policy_runs:validate_dpo_config",
            resumable=True,
        ),
        RunKind(
            "evaluate",
            "Evaluation",
            "a candidate policy against its parent on held-out prompts, under a reward model",
            EvaluateRunConfig,
            handler="app.jobs.evaluate:run",
            validate="app.services.evaluation:validate_evaluate_config",
            resumable=True,
        ),
        RunKind(
            "score",
            "Scoring",
            "rewards of answers under a reward model (POST /models/{id}/score)",
            ScoreRunConfig,
            handler="app.jobs.interactive:score",
            validate="app.services.interactive:validate_score_config",
            launchable=False,
        ),
        RunKind(
            "sample",
            "Playground",
            "a policy version answers one prompt (POST /models/{id}/generate)",
            SampleRunConfig,
            handler="app.jobs.interactive:sample",
            validate="app.services.interactive:validate_sample_config",
            launchable=False,
        ),
    )
}

KIND_NAMES: tuple[str, ...] = tuple(RUN_KINDS)
LAUNCHABLE_KINDS: tuple[str, ...] = tuple(k.name for k in RUN_KINDS.values() if k.launchable)
