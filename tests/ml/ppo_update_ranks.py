"""One PPO update on a fixed rollout, in this process or as a torchrun rank (DDP, gloo).

`tests/ml/test_ppo_distributed.py` runs `update` here with `ranks=None` and runs this module
under torchrun in two ranks: `python -m tests.ml.ppo_update_ranks CONFIG.json MODEL_DIR OUT.pt`.
Every rank builds the *whole* rollout itself from the same seeds (one process's sampling, so
the sampled tokens are identical everywhere), then trains on it under DDP, each rank on its
part of every micro-batch. Rank 0 writes the update's diagnostics and the trained weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from app.ml import ppo
from app.ml.distributed import Ranks, init_ranks
from tests.ml.test_ppo import PROMPTS, count_rewarded


def update(config: ppo.PPOConfig, model_dir: Path, ranks: Ranks | None) -> dict[str, Any]:
    """The diagnostics of one `_ppo_update` and the trainable weights after it."""
    torch.set_num_threads(1)
    run = ppo._setup(config, model_dir, count_rewarded, ranks)
    run.ranks = None  # the whole rollout, sampled as one process samples it, on every rank
    messages = [ppo.as_messages(p) for p in PROMPTS]
    rollout = ppo._rollout(run, [messages[i % len(messages)] for i in range(config.batch_size)])
    run.ranks = ranks
    start = [p.detach().clone() for p in run.params]
    if ranks is not None:
        run.trained = ppo._wrap_for_update(run, ranks)
    stats = ppo._ppo_update(run, rollout)
    weights = {
        f"{role}.{name}": p.detach().clone()
        for role, model in (("policy", run.policy), ("value", run.value_model))
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    moved = max(float((p - p0).abs().max()) for p, p0 in zip(run.params, start, strict=True))
    return {"stats": stats, "weights": weights, "moved": moved}


def main(argv: list[str]) -> int:
    config = ppo.PPOConfig(**json.loads(Path(argv[0]).read_text()))
    ranks = init_ranks()
    out = update(config, Path(argv[1]), ranks)
    if ranks.is_main:
        torch.save(out, argv[2])
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
