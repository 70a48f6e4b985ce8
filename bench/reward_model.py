"""Reward-model benchmark: Verdict's trainer (full and last_n modes) against TRL's RewardTrainer.

    .venv/bin/python bench/reward_model.py            # the comparison; writes docs/benchmarks.md
    .venv/bin/python bench/reward_model.py --quick    # a smoke test of the script (no docs)

Data: HH-RLHF harmless-base test split (2,312 pairs), read in place from ../shared. Fixed split
by index: the last 512 pairs are held out; training uses the first `--train-pairs` pairs of the
rest, minus those with a sequence over `--max-length` tokens (TRL drops such pairs, so every
trainer gets the same set). Each transcript becomes chat messages: the shared turns are the
prompt, the final Assistant turn is the response; SmolLM2's chat template renders them.

The three trainers run one after the other, each in its own process so its peak RSS is its own:
Verdict in .venv, TRL in `var/bench-venv-trl` (created on first use: a venv that sees .venv's
packages through a .pth file, so the very same torch and transformers, plus `pip install trl`).
Held-out accuracy is computed for every trained model by the same code
(`app.ml.reward.evaluate_reward_model`: the reward at the last real token of the chat-templated
sequence, which is where TRL's model reads it too).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
WORK = ROOT / "var" / "bench" / "reward_model"
TRL_VENV = ROOT / "var" / "bench-venv-trl"
SECTION = "## Reward model"
HELD_OUT = 512


@dataclasses.dataclass
class Budget:
    train_pairs: int = 256
    eval_pairs: int = HELD_OUT
    max_length: int = 512
    batch_size: int = 8
    epochs: int = 1
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    fast_last_n_layers: int = 4
    fast_learning_rate: float = 1e-4


# --- data ------------------------------------------------------------------------------------

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def transcript_messages(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' → [{'role': 'user', ...}, {'role': 'assistant', ...}]."""
    parts = _TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)
    ]


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """Every pair as {'index', 'prompt', 'chosen', 'rejected'}, or None where it cannot be split
    into a shared prompt and a final assistant answer (the index is kept either way)."""
    out: list[dict[str, Any]] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for index, line in enumerate(f):
            record = json.loads(line)
            chosen = transcript_messages(record["chosen"])
            rejected = transcript_messages(record["rejected"])
            usable = (
                chosen
                and rejected
                and chosen[-1]["role"] == "assistant"
                and rejected[-1]["role"] == "assistant"
                and chosen[:-1] == rejected[:-1]
                and chosen[:-1]
            )
            out.append(
                {
                    "index": index,
                    "prompt": chosen[:-1] if usable else None,
                    "chosen": chosen[-1]["content"] if usable else None,
                    "rejected": rejected[-1]["content"] if usable else None,
                }
            )
    return out


def to_examples(pairs: list[dict[str, Any]]) -> list[Any]:
    from app.ml.preferences import PreferenceExample

    return [
        PreferenceExample(prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"])
        for p in pairs
    ]


def select(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pairs = load_pairs(Path(spec["data"]))
    by_index = {p["index"]: p for p in pairs}
    return [by_index[i] for i in spec["train_indices"]], [by_index[i] for i in spec["eval_indices"]]


# --- workers (one process each) ----------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _heldout(model_dir: Path, spec: dict[str, Any], eval_pairs: list[dict[str, Any]]) -> dict:
    from app.ml.reward import evaluate_reward_model

    started = time.perf_counter()
    metrics = evaluate_reward_model(
        model_dir, to_examples(eval_pairs), max_length=spec["budget"]["max_length"], batch_size=8
    )
    return {"heldout": metrics, "eval_seconds": time.perf_counter() - started}


def worker_verdict(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    from app.ml.hooks import RecordingHooks
    from app.ml.reward import RewardConfig, train_reward_model

    budget = Budget(**spec["budget"])
    train, eval_pairs = select(spec)

    class PrintingHooks(RecordingHooks):
        def progress(self, done: int, total: int | None, message: str = "") -> None:
            super().progress(done, total, message)
            print(f"[verdict-{mode}] {message}", file=sys.stderr, flush=True)

    fast = mode == "last_n"
    config = RewardConfig(
        backbone=spec["backbone"],
        max_length=budget.max_length,
        train_mode=mode,
        last_n_layers=budget.fast_last_n_layers,
        learning_rate=budget.fast_learning_rate if fast else budget.learning_rate,
        batch_size=budget.batch_size,
        epochs=budget.epochs,
        warmup_ratio=budget.warmup_ratio,
        max_grad_norm=budget.max_grad_norm,
        seed=budget.seed,
    )
    out = WORK / f"verdict-{mode}"
    started = time.perf_counter()
    result = train_reward_model(config, to_examples(train), [], out, hooks=PrintingHooks())
    wall = time.perf_counter() - started
    train_rss = _peak_rss_mib()
    return {
        "name": f"Verdict {mode}",
        "pairs": result.train_pairs,
        "pairs_trained": result.train_examples * budget.epochs,
        "train_seconds": result.train_seconds,
        "wall_seconds": wall,
        "peak_rss_train_mib": train_rss,
        **_heldout(out, spec, eval_pairs),
        "peak_rss_mib": _peak_rss_mib(),
    }


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    budget = Budget(**spec["budget"])
    train, eval_pairs = select(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["backbone"])
    torch.manual_seed(budget.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["backbone"], num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [
        {
            "chosen": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}],
            "rejected": [*p["prompt"], {"role": "assistant", "content": p["rejected"]}],
        }
        for p in train
    ]
    out = WORK / "trl"
    args = RewardConfig(
        output_dir=str(WORK / "trl-run"),
        per_device_train_batch_size=budget.batch_size,
        num_train_epochs=budget.epochs,
        learning_rate=budget.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=budget.warmup_ratio,
        max_grad_norm=budget.max_grad_norm,
        max_length=budget.max_length,
        seed=budget.seed,
        # TRL's defaults are for GPUs; on this CPU, fp32 without activation checkpointing is its
        # fastest setting, and the same arithmetic Verdict does.
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    pairs = len(trainer.train_dataset)
    output = trainer.train()
    train_rss = _peak_rss_mib()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    return {
        "name": f"TRL {trl.__version__} RewardTrainer",
        "pairs": pairs,
        "pairs_trained": pairs * budget.epochs,
        "train_seconds": output.metrics["train_runtime"],
        "wall_seconds": output.metrics["train_runtime"],
        "peak_rss_train_mib": train_rss,
        **_heldout(out, spec, eval_pairs),
        "peak_rss_mib": _peak_rss_mib(),
    }


# --- orchestration -----------------------------------------------------------------------------


def ensure_trl_venv() -> Path:
    """A dev-only venv with TRL that reuses .venv's torch and transformers (never a CUDA torch)."""
    python = TRL_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl"]).returncode == 0:
        return python
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([base, "-m", "venv", str(TRL_VENV)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    main_site = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
    (TRL_VENV / "lib" / version / "site-packages" / "_verdict_main_venv.pth").write_text(
        main_site + "\n"
    )
    subprocess.run([python, "-m", "pip", "install", "-q", "trl"], check=True)
    return python


def tokenized_lengths(backbone: str, pairs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    from app.ml.reward import _conversation_ids, load_tokenizer

    tokenizer = load_tokenizer(backbone)
    return [
        (
            len(_conversation_ids(tokenizer, p["prompt"], p["chosen"])),
            len(_conversation_ids(tokenizer, p["prompt"], p["rejected"])),
        )
        for p in pairs
    ]


def run_worker(python: Path, name: str, spec_path: Path) -> dict[str, Any]:
    print(f"--- {name}", file=sys.stderr, flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(python), __file__, "--worker", name, "--spec", str(spec_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    print(json.dumps(result, indent=2), file=sys.stderr, flush=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    trl = next((r for r in results if r["name"].startswith("TRL")), None)
    lines = [
        "| trainer | pairs | train s | pairs/s | vs TRL | peak RSS (train) | held-out acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rate = r["pairs_trained"] / r["train_seconds"]
        ratio = rate / (trl["pairs_trained"] / trl["train_seconds"]) if trl else float("nan")
        lines.append(
            f"| {r['name']} | {r['pairs']} | {r['train_seconds']:.0f} | {rate:.3f} | "
            f"{ratio:.2f}× | {r['peak_rss_train_mib'] / 1024:.1f} GiB | "
            f"{r['heldout']['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 train / 32 held-out pairs")
    parser.add_argument("--train-pairs", type=int, default=Budget.train_pairs)
    parser.add_argument("--max-length", type=int, default=Budget.max_length)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--only", nargs="*", default=["full", "last_n", "trl"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.spec.read_text())
        result = worker_trl(spec) if args.worker == "trl" else worker_verdict(args.worker, spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from app.ml.loading import resolve_model_dir

    budget = Budget(train_pairs=args.train_pairs, max_length=args.max_length)
    if args.quick:
        budget = dataclasses.replace(budget, train_pairs=16, eval_pairs=32)
    backbone = str(resolve_model_dir("smollm2", ROOT / "var" / "artifacts"))
    pairs = load_pairs(args.data)
    held_out = [p for p in pairs[-HELD_OUT:] if p["prompt"] is not None][: budget.eval_pairs]
    first = [p for p in pairs[:-HELD_OUT][: budget.train_pairs] if p["prompt"] is not None]
    lengths = tokenized_lengths(backbone, first)
    train = [p for p, (c, r) in zip(first, lengths, strict=True) if max(c, r) <= budget.max_length]
    print(
        f"train {len(train)} of the first {budget.train_pairs} pairs "
        f"({len(first) - len(train)} over {budget.max_length} tokens or unparsable dropped), "
        f"held out {len(held_out)}",
        file=sys.stderr,
    )
    WORK.mkdir(parents=True, exist_ok=True)
    spec = {
        "data": str(args.data),
        "backbone": backbone,
        "budget": dataclasses.asdict(budget),
        "train_indices": [p["index"] for p in train],
        "eval_indices": [p["index"] for p in held_out],
    }
    spec_path = WORK / "spec.json"
    spec_path.write_text(json.dumps(spec))

    started = time.perf_counter()
    results = []
    for name in args.only:
        python = ensure_trl_venv() if name == "trl" else Path(sys.executable)
        results.append(run_worker(python, name, spec_path))
    print(table(results))

    if args.quick or args.only != ["full", "last_n", "trl"]:
        print("(--quick or partial run: docs/benchmarks.md left unchanged)", file=sys.stderr)
        return
    write_section(
        SECTION, report(budget, results, len(train), len(held_out), time.perf_counter() - started)
    )


def report(
    budget: Budget, results: list[dict[str, Any]], n_train: int, n_eval: int, seconds: float
) -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    return f"""{SECTION}

Command: `.venv/bin/python bench/reward_model.py` (smoke test: `--quick`). Whole comparison:
{seconds / 60:.0f} min on {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__},
transformers {transformers.__version__}.

Data: HH-RLHF harmless-base test split, read from `../shared/data/hh-rlhf/`. Held out: the last
{HELD_OUT} pairs by index ({n_eval} usable). Training: the first {budget.train_pairs} pairs, less
those with a sequence over {budget.max_length} tokens (TRL drops them): {n_train} pairs.
Backbone SmolLM2-135M-Instruct (float32), max length {budget.max_length}, {budget.epochs}
epoch, batch {budget.batch_size} pairs, AdamW lr {budget.learning_rate} with
{budget.warmup_ratio:.0%} warmup and cosine decay, gradient clipping {budget.max_grad_norm},
seed {budget.seed}. TRL runs with `bf16=False, gradient_checkpointing=False` (its fastest CPU
setting). Fast mode (`last_n`): the top {budget.fast_last_n_layers} layers, norm and head train,
lr {budget.fast_learning_rate}; its time includes computing the frozen part once.
Held-out accuracy: the same scorer for every model (`evaluate_reward_model`).

{table(results)}

Pairs/s = training pairs / training seconds (TRL: its `train_runtime`; Verdict: the training
steps plus, in fast mode, the frozen-part pass; model loading, tokenization and evaluation are
excluded for both). Peak RSS is the training process's, measured before evaluation.
"""


if __name__ == "__main__":
    main()
