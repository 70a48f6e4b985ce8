"""Multi-process training overhead: reward-model training in two gloo processes against one.

    .venv/bin/python bench/distributed.py            # 2 pairs of A/B; writes docs/benchmarks.md
    .venv/bin/python bench/distributed.py --quick    # a smoke test of the script (no docs)

A: `train_reward_model` in one process with torch's threads set to the number of processes of
B (so both use the same cores). B: the same config and data through `app.ml.distributed.launch`,
two torchrun ranks on the gloo backend with one thread each, DDP averaging the gradients; the
batch size is the global batch in both. C: one process with one thread (what one rank of B has
to itself). Runs alternate A B C A B C in one invocation, so a change in the machine's load hits
all of them; each round gives the ratios B/A and B/C. Steps/s is over the training steps only
(the trainer's own `train_seconds`); the wall time adds process start and model loading.

The figure that matters on a CPU is correctness: the loss curve of B against A's, step by step
(largest relative difference). On GPUs (nccl, one rank per device) the speed figures are what
a multi-GPU run is for; this machine has none.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "var" / "bench" / "distributed"
SECTION = "## Multi-process training"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "yes",
    "no",
    "maybe",
    "bad",
    "better",
    "worse",
    "honest",
]


def examples(n: int, seed: int = 0) -> list[Any]:
    """Synthetic preference pairs: the response holding `helpful` is the preferred one."""
    from app.ml.preferences import PreferenceExample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(8, 24))]
        chosen.insert(rng.randint(0, len(chosen)), "helpful")
        rejected = [rng.choice(WORDS) for _ in range(rng.randint(8, 24))]
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
        out.append(
            PreferenceExample(
                prompt=[{"role": "user", "content": f"{prompt} #{i}"}],
                chosen=" ".join(chosen),
                rejected=" ".join(rejected),
                group=str(i),
            )
        )
    return out


def backbone(hidden: int, layers: int) -> Path:
    """A random Llama of this size with the tests' tiny tokenizer, saved once."""
    from tests.tiny_models import make_causal_lm, make_tokenizer

    path = WORK / f"llama-h{hidden}-l{layers}"
    if not (path / "config.json").exists():
        tokenizer = make_tokenizer(pad_equals_eos=True)
        model = make_causal_lm(tokenizer, seed=0, hidden=hidden, layers=layers)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def run_once(label: str, processes: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run: in this process with `threads` (processes=1), else through torchrun."""
    import torch

    from app.kinds.reward import RewardConfig
    from app.ml.distributed import launch
    from app.ml.hooks import RecordingHooks
    from app.ml.reward import train_reward_model

    data = examples(args.pairs)
    config = RewardConfig(
        backbone=str(backbone(args.hidden, args.layers)),
        train_mode="full",
        learning_rate=1e-3,
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_ratio=0.0,
        max_length=256,
        device="cpu",
    )
    out = WORK / f"run-{label}"
    shutil.rmtree(out, ignore_errors=True)
    hooks = RecordingHooks()
    kwargs: dict[str, Any] = {
        "config": config,
        "train": data,
        "val": [],
        "output_dir": out / "model",
    }
    started = time.perf_counter()
    if processes == 1:
        torch.set_num_threads(threads)
        result = train_reward_model(**kwargs, hooks=hooks)
    else:
        os.environ["OMP_NUM_THREADS"] = "1"
        result = launch("reward", kwargs, processes, out / "launch", hooks)
    wall = time.perf_counter() - started
    return {
        "label": label,
        "processes": processes,
        "threads": threads,
        "steps": result.steps,
        "steps_per_s": result.steps / result.train_seconds,
        "wall_s": wall,
        "losses": hooks.series("loss/train"),
    }


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no docs written")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.batch_size, args.steps, args.hidden, args.layers = 16, 4, 3, 32, 2
        args.repeats = 1
    WORK.mkdir(parents=True, exist_ok=True)

    runs = []
    variants = (("A", 1, args.processes), ("B", args.processes, 1), ("C", 1, 1))
    for i in range(args.repeats):
        for label, n, threads in variants:
            run = run_once(f"{label}{i + 1}", n, threads, args)
            runs.append(run)
            print(
                f"{run['label']}: {n} process(es) x {threads} thread(s),"
                f" {run['steps_per_s']:.3f} steps/s, wall {run['wall_s']:.1f} s,"
                f" final loss {run['losses'][-1]:.5f}",
                flush=True,
            )
    by = {v[0]: [r for r in runs if r["label"][0] == v[0]] for v in variants}
    b_a = [b["steps_per_s"] / a["steps_per_s"] for a, b in zip(by["A"], by["B"], strict=True)]
    b_c = [b["steps_per_s"] / c["steps_per_s"] for c, b in zip(by["C"], by["B"], strict=True)]
    diffs = [max_rel_diff(a["losses"], b["losses"]) for a, b in zip(by["A"], by["B"], strict=True)]
    print(f"B/A steps/s per round: {', '.join(f'{r:.2f}' for r in b_a)}")
    print(f"B/C steps/s per round: {', '.join(f'{r:.2f}' for r in b_c)}")
    print(f"largest relative loss difference B vs A: {', '.join(f'{d:.1e}' for d in diffs)}")
    if args.quick:
        return

    rows = "\n".join(
        f"| {r['label']} | {r['processes']} | {r['threads']} | {r['steps_per_s']:.3f} |"
        f" {r['wall_s']:.1f} | {r['losses'][-1]:.5f} |"
        for r in runs
    )
    load = os.getloadavg()[0]
    cpu = os.cpu_count()
    spread = {
        k: (min(r["steps_per_s"] for r in v), max(r["steps_per_s"] for r in v))
        for k, v in by.items()
    }
    text = f"""{SECTION}

Command: `.venv/bin/python bench/distributed.py --repeats {args.repeats}`. A random Llama
(hidden {args.hidden}, {args.layers} layers), full fine-tuning of a reward model on
{args.pairs} synthetic pairs, global batch {args.batch_size}, {args.steps} steps. A: one
process, {args.processes} torch threads; B: {args.processes} torchrun ranks (gloo, DDP), one
thread each; C: one process, one thread. Alternated A B C A B C ... in one invocation on this
machine ({platform.machine()}, {cpu} cores, shared with other work; load average {load:.1f}
at the end). Steps/s counts training steps only; wall time adds process
start and model loading (for B: torchrun, and torch and transformers imported by each rank).

| run | processes | threads each | steps/s | wall s | final loss |
|---|---|---|---|---|---|
{rows}

- B/A steps/s per round: {", ".join(f"{r:.2f}" for r in b_a)} (median
  {statistics.median(b_a):.2f}); B/C: {", ".join(f"{r:.2f}" for r in b_c)} (median
  {statistics.median(b_c):.2f}). Steps/s across rounds: A {spread["A"][0]:.2f}-{spread["A"][1]:.2f},
  B {spread["B"][0]:.2f}-{spread["B"][1]:.2f}, C {spread["C"][0]:.2f}-{spread["C"][1]:.2f}: the
  machine's load moves every figure by more than the variants differ, so read the ratios
  round by round.
- Correctness, the figure that matters on a CPU: the largest relative difference of B's
  training loss from A's at any step is {", ".join(f"{d:.1e}" for d in diffs)} per round (the
  tests hold two processes to 1e-3 relative, `tests/ml/test_distributed.py`). DDP sums the
  gradients in another order than one process does; the difference is float32 rounding.
- Speed on this shared CPU says little about GPUs: B/A compares two single-threaded ranks
  with one process whose two intra-op threads contend with the machine's other work (see
  "Worker sizing" in docs/operations.md for how badly a second thread fares under load), and
  B/C is the parallel speedup over what one rank has alone, less the per-micro-batch gradient
  all-reduce. The point of `num_processes` is one rank per GPU (nccl); no GPU was lent to
  this measurement.
"""
    write_section(SECTION, text)
    print(f"wrote {SECTION} in docs/benchmarks.md")


if __name__ == "__main__":
    main()
