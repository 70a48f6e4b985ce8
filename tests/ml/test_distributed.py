"""Training in two torchrun processes (gloo, CPU) against one: the batch sharding, the same loss
curve within a stated tolerance (reward and DPO), and cancel + resume through the launcher.

The trainers are called directly: `train_reward_model`/`train_dpo` in this process, and the
same config and data through `app.ml.distributed.launch` in two ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForSequenceClassification

from app.kinds.ppo import PPORunConfig
from app.ml import dpo
from app.ml.distributed import launch, shard
from app.ml.hooks import Cancelled, RecordingHooks
from app.ml.reward import RewardConfig, train_reward_model
from app.models import Run
from tests.conftest import Factory, bearer
from tests.ml.test_dpo import PAIRS
from tests.ml.test_reward import synthetic_examples
from tests.tiny_models import save_tiny_model

# Two processes sum their gradients in another order than one does (DDP all-reduce), and
# float32 rounding then grows with the steps: the curves agree to this relative tolerance
# (measured: losses within ~3e-6 relative, gradient norms within ~1e-4 by the sixth step).
REL_TOL = 1e-3


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("ddp") / "lm", pad_equals_eos=True)


def group_gone(pid: int) -> bool:
    """No process of torchrun's process group (it, its ranks) is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- sharding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_contiguous_balanced_and_cover_the_batch(n: int, world: int) -> None:
    items = list(range(100, 100 + n))
    parts = [shard(items, rank, world) for rank in range(world)]
    assert [x for part in parts for x in part] == items  # rank order gives the batch back
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_a_batch_smaller_than_the_world_leaves_the_last_ranks_empty() -> None:
    assert [shard(["a"], r, 2) for r in range(2)] == [["a"], []]
    assert [shard([1, 2, 3], r, 2) for r in range(2)] == [[1, 2], [3]]


# --- reward: two processes, one curve ---------------------------------------------------------


def reward_config(backbone: Path, **overrides: Any) -> RewardConfig:
    values: dict[str, Any] = {
        "backbone": str(backbone),
        "learning_rate": 3e-3,
        # 21 pairs in batches of 5 with 2 per step: shards of 3 and 2, and a last batch of one
        # pair that leaves rank 1 an empty shard (its zero-weighted forward).
        "batch_size": 5,
        "grad_accumulation": 2,
        "epochs": 2,
        "warmup_ratio": 0.0,
        "eval_every": 2,
        "train_mode": "full",
        "device": "cpu",
    }
    values.update(overrides)
    return RewardConfig(**values)


def assert_same_curves(one: RecordingHooks, two: RecordingHooks, names: list[str]) -> None:
    assert [s for s, _ in two.metric_calls] == [s for s, _ in one.metric_calls]
    for name in names:
        assert one.series(name), name
        assert two.series(name) == pytest.approx(one.series(name), rel=REL_TOL, abs=1e-6), name


def test_reward_in_two_processes_follows_the_one_process_curve(
    backbone: Path, tmp_path: Path
) -> None:
    examples = synthetic_examples(24, seed=0)
    train, val = examples[:21], examples[21:]
    config = reward_config(backbone)
    one = RecordingHooks()
    single = train_reward_model(config, train, val, tmp_path / "one", tmp_path / "ck1", one)
    two = RecordingHooks()
    kwargs = {
        "config": config, "train": train, "val": val,
        "output_dir": tmp_path / "two", "checkpoint_dir": tmp_path / "ck2",
    }  # fmt: skip
    double = launch("reward", kwargs, 2, tmp_path / "launch", two)

    assert double.steps == single.steps == 6
    assert_same_curves(one, two, ["loss/train", "accuracy/train", "grad/norm", "loss/val"])
    assert [c[:2] for c in two.progress_calls] == [c[:2] for c in one.progress_calls]
    assert one.series("loss/train")[-1] < one.series("loss/train")[0]  # it did learn
    # Rank 0 saved the model; its weights are one process's within the same tolerance.
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "one").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two").state_dict()
    for name, tensor in a.items():
        assert torch.allclose(tensor, b[name], rtol=REL_TOL, atol=1e-5), name


# --- DPO: two processes, one curve --------------------------------------------------------------


def dpo_kwargs(backbone: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        # 9 pairs, 4 per step in micro-batches of 2: shards of one pair each, and a last step
        # of one pair where rank 1's shard is empty.
        epochs=2, batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3, beta=0.1,
        checkpoint_every=100, device="cpu",
    )  # fmt: skip
    values.update(overrides)
    return {
        "config": dpo.DPOConfig(**values),
        "policy_dir": backbone,
        "pairs": [*PAIRS, PAIRS[0]],
        "output_dir": out / "model",
        "checkpoint_dir": out / "checkpoints",
    }


def test_dpo_in_two_processes_follows_the_one_process_curve(backbone: Path, tmp_path: Path) -> None:
    one = RecordingHooks()
    single = dpo.train_dpo(**dpo_kwargs(backbone, tmp_path / "one"), hooks=one)
    two = RecordingHooks()
    double = launch("dpo", dpo_kwargs(backbone, tmp_path / "two"), 2, tmp_path / "launch", two)
    assert double.steps == single.steps == 6
    names = ["loss/dpo", "rewards/chosen", "rewards/margins", "rewards/accuracy", "epoch"]
    assert_same_curves(one, two, names)
    assert one.series("rewards/margins")[-1] > 0
    assert (tmp_path / "two" / "model" / "config.json").exists()


# --- cancel and resume through the launcher -----------------------------------------------------


def test_a_cancel_stops_both_ranks_and_the_resumed_run_ends_on_the_same_curve(
    backbone: Path, tmp_path: Path
) -> None:
    examples = synthetic_examples(24, seed=1)
    train, val = examples[:21], examples[21:]
    # 30 steps: enough that a stop asked for after the third lands before the last on a fast
    # machine (the launcher polls every 0.2 s; a tiny step takes far less).
    config = reward_config(backbone, epochs=10)
    one = RecordingHooks()
    train_reward_model(config, train, val, tmp_path / "one", None, one)

    kwargs = {
        "config": config, "train": train, "val": val,
        "output_dir": tmp_path / "two", "checkpoint_dir": tmp_path / "ck",
    }  # fmt: skip
    pids: list[int] = []
    stopping = RecordingHooks(stop_after_progress=3)
    with pytest.raises(Cancelled, match="cancelled at step"):
        launch("reward", kwargs, 2, tmp_path / "launch", stopping, on_start=pids.append)
    assert group_gone(pids[0])  # torchrun and both ranks
    assert (tmp_path / "ck" / "checkpoint.pt").exists()
    assert not (tmp_path / "two").exists()
    # Rank 0 stopped at the first step boundary after the request (it sees it within a step).
    stopped_at = len(stopping.progress_calls)
    assert 3 <= stopped_at < 30

    resumed = RecordingHooks()
    result = launch("reward", kwargs, 2, tmp_path / "launch", resumed, on_start=pids.append)
    assert result.steps == 30
    assert [s for s, _ in resumed.metric_calls] == list(range(stopped_at + 1, 31))
    combined = RecordingHooks()
    combined.metric_calls = stopping.metric_calls + resumed.metric_calls
    assert_same_curves(one, combined, ["loss/train", "grad/norm", "loss/val"])
    assert group_gone(pids[1])


def test_a_failing_rank_fails_the_launch_with_its_error(backbone: Path, tmp_path: Path) -> None:
    kwargs = dpo_kwargs(backbone, tmp_path)
    kwargs["policy_dir"] = tmp_path / "no-such-model"
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="dpo training in 2 processes failed"):
        launch("dpo", kwargs, 2, tmp_path / "launch", RecordingHooks(), on_start=pids.append)
    assert group_gone(pids[0])


# --- the knob -----------------------------------------------------------------------------------


def test_num_processes_is_taken_for_every_trainer_and_bounded_by_the_ppo_batch(
    client: TestClient, factory: Factory
) -> None:
    project = factory.project("ddp-knob", base_policy="/models/base")
    admin = bearer(factory.token(factory.user("admin")))
    url = f"/api/v1/projects/{project.slug}/runs"
    # PPO: every process samples at least one prompt of each step's batch.
    config = {"num_processes": 3, "batch_size": 2, "mini_batch_size": 2}
    ppo = client.post(url, json={"kind": "ppo", "config": config}, headers=admin)
    assert ppo.status_code == 422, ppo.text
    (error,) = ppo.json()["errors"]
    assert error["field"] == "config.num_processes"
    assert "num_processes 3 exceeds batch_size 2" in error["message"]
    assert PPORunConfig(num_processes=2).num_processes == 2
    too_few = client.post(url, json={"kind": "dpo", "config": {"num_processes": 0}}, headers=admin)
    assert too_few.status_code == 422
    assert too_few.json()["errors"][0]["field"] == "config.num_processes"
    assert factory.count(Run) == 0
    reward = client.post(
        url, json={"kind": "reward", "config": {"num_processes": 2}}, headers=admin
    )
    assert reward.status_code == 201, reward.text
    assert reward.json()["config"]["num_processes"] == 2
