"""PPO throughput and memory on SmolLM2-135M: Verdict's `app.ml.ppo` vs TRL 1.12's PPOTrainer.

    .venv/bin/python bench/ppo.py --quick          # a smoke run of every variant (minutes)
    .venv/bin/python bench/ppo.py --write-docs     # the full comparison, written to the docs

Policy: SmolLM2-135M-Instruct (`resolve_model_dir("smollm2", var/artifacts)`). Reward model:
SmolLM2-135M's backbone with an UNTRAINED, seeded scalar head (`num_labels=1`). Its scores mean
nothing; it is here because throughput and memory depend on the architecture, not on what the
head learned. The value model starts from it, as in both implementations.

Each variant (ours / TRL, full fine-tuning / LoRA) runs in its own process, so peak memory is
that variant's alone: peak resident set size on the CPU, `torch.cuda.max_memory_allocated` on a
GPU. TRL runs in its own virtual environment (`var/bench-venv-trl112`, created by this script:
`torch==2.13.0` first, so pip keeps the CPU build, then `trl==1.12.*`, the last release with
PPO). Both get the same prompts (first human turns of the HH-RLHF harmless-base test split),
the same batch, micro-batch, PPO epochs, response length, temperature and KL/EOS settings.

Figures:
- rollout tokens/s: real response tokens (up to the first EOS) per second of the rollout
  phase: sampling plus the policy, reference, value and reward forward passes.
- update samples/s: responses x PPO epochs per second of the update phase (the clipped policy
  and value losses, backward, optimizer steps).
The first step is a warm-up and is left out when more than one step runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "var" / "bench-venv-trl112"
WORK = ROOT / "var" / "bench" / "ppo"
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
DOCS = ROOT / "docs" / "benchmarks.md"

FULL = {"steps": 3, "batch": 8, "micro": 4, "epochs": 4, "new_tokens": 64, "prompt_tokens": 128}
QUICK = {"steps": 1, "batch": 2, "micro": 2, "epochs": 1, "new_tokens": 16, "prompt_tokens": 64}
SEED = 0
COMMON = {"temperature": 0.7, "kl_coef": 0.05, "missing_eos_penalty": 1.0}
LORA = {"r": 16, "alpha": 32}


# ---- shared helpers (run in both virtual environments: stdlib, torch, transformers only) -------


def peak_memory_bytes() -> int:
    """Peak GPU allocation when on CUDA, else this process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def load_prompts(n: int) -> list[str]:
    """First human turns of real HH-RLHF transcripts (built-in questions if it is missing)."""
    prompts: list[str] = []
    if HH_RLHF.exists():
        with gzip.open(HH_RLHF, "rt") as f:
            for line in f:
                text = json.loads(line)["chosen"]
                match = re.search(r"Human: (.*?)\n\nAssistant:", text, re.S)
                if match and match.group(1).strip():
                    prompts.append(match.group(1).strip())
                if len(prompts) == n:
                    break
    fallback = ["What is the capital of France?", "How do I bake bread?", "Explain gravity."]
    while len(prompts) < n:
        prompts.append(fallback[len(prompts) % len(fallback)])
    return prompts


def summarise(rollout: list[tuple[int, float]], update: list[float], s: dict[str, Any]) -> dict:
    """Throughput over the measured steps (the first is a warm-up when there are several)."""
    if len(update) > 1:
        rollout, update = rollout[1:], update[1:]
    tokens = sum(t for t, _ in rollout)
    rollout_s = sum(sec for _, sec in rollout)
    update_s = sum(update)
    return {
        "rollout_tokens_per_s": tokens / rollout_s,
        "update_samples_per_s": s["batch"] * s["epochs"] * len(update) / update_s,
        "step_s": (rollout_s + update_s) / len(update),
        "mean_response_tokens": tokens / (len(rollout) * s["batch"]),
        "peak_memory_bytes": peak_memory_bytes(),
    }


# ---- worker: ours ----------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, s: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch

    from app.ml.hooks import RecordingHooks
    from app.ml.ppo import PPOConfig, train_ppo

    config = PPOConfig(
        seed=SEED,
        total_steps=s["steps"],
        batch_size=s["batch"],
        mini_batch_size=s["batch"],
        gradient_accumulation_steps=s["batch"] // s["micro"],
        ppo_epochs=s["epochs"],
        learning_rate=1e-5 if args.lora else 1e-6,
        max_prompt_length=s["prompt_tokens"],
        max_new_tokens=s["new_tokens"],
        temperature=COMMON["temperature"],
        kl_coef=COMMON["kl_coef"],
        missing_eos_penalty=COMMON["missing_eos_penalty"],
        use_lora=args.lora,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        rollout_forward_batch_size=s["batch"],
        sample_every=10**6,
        checkpoint_every=10**6,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    hooks = RecordingHooks()
    scratch = Path(tempfile.mkdtemp(dir=WORK, prefix="ours."))
    try:
        train_ppo(
            config,
            args.policy,
            args.reward,
            load_prompts(s["batch"] * s["steps"]),
            scratch / "out",
            scratch / "ckpt",
            hooks,
            resume=False,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lengths = hooks.series("response/length")
    rollout = [
        (round(n * s["batch"]), sec)
        for n, sec in zip(lengths, hooks.series("time/rollout"), strict=True)
    ]
    return summarise(rollout, hooks.series("time/update"), s)


# ---- worker: TRL 1.12 --------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, s: dict[str, Any]) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    prompt_ids = []
    for p in load_prompts(s["batch"] * s["steps"]):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids.append(
            tokenizer(text, add_special_tokens=False)["input_ids"][-s["prompt_tokens"] :]
        )
    dataset = Dataset.from_dict({"input_ids": prompt_ids})

    # Phase boundaries: the rollout starts with sampling; the update starts at the first forward
    # pass with gradients; the step ends at `on_step_end`.
    marks: dict[str, Any] = {"rollout": [], "update": [], "tokens": []}
    state: dict[str, float] = {}
    original_generation, original_forward = module.batch_generation, module.forward

    def timed_generation(model: Any, queries: Any, *rest: Any, **kw: Any) -> Any:
        state["rollout_start"] = time.perf_counter()
        state.pop("update_start", None)
        out = original_generation(model, queries, *rest, **kw)
        responses = out[0][:, queries.shape[1] :]
        for row in responses.tolist():
            marks["tokens"].append(row.index(eos) + 1 if eos in row else len(row))
        return out

    def timed_forward(model: Any, *rest: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled() and "update_start" not in state:
            state["update_start"] = time.perf_counter()
        return original_forward(model, *rest, **kw)

    module.batch_generation, module.forward = timed_generation, timed_forward

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            end = time.perf_counter()
            marks["rollout"].append(state["update_start"] - state["rollout_start"])
            marks["update"].append(end - state["update_start"])

    use_cuda = torch.cuda.is_available()
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    ref = None if args.lora else AutoModelForCausalLM.from_pretrained(args.policy)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    scratch = Path(tempfile.mkdtemp(dir=WORK, prefix="trl."))
    config = PPOConfig(
        output_dir=str(scratch),
        seed=SEED,
        per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=s["batch"] // s["micro"],
        num_mini_batches=1,
        num_ppo_epochs=s["epochs"],
        total_episodes=s["batch"] * s["steps"],
        local_rollout_forward_batch_size=s["batch"],
        learning_rate=1e-5 if args.lora else 1e-6,
        response_length=s["new_tokens"],
        temperature=COMMON["temperature"],
        kl_coef=COMMON["kl_coef"],
        missing_eos_penalty=COMMON["missing_eos_penalty"],
        stop_token="eos",
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        use_cpu=not use_cuda,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tokens = marks["tokens"]
    rollout = [
        (sum(tokens[i * s["batch"] : (i + 1) * s["batch"]]), sec)
        for i, sec in enumerate(marks["rollout"])
    ]
    result = summarise(rollout, marks["update"], s)
    result["trl_version"] = trl.__version__
    return result


# ---- orchestration (our virtual environment) -----------------------------------------------


def ensure_trl_venv() -> Path:
    """Create `var/bench-venv-trl112` once: CPU torch 2.13.0 first, then TRL 1.12 and peft."""
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import trl, peft; assert trl.__version__.startswith('1.12')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "trl==1.12.*", "peft"], check=True)
    return python


def ensure_models() -> tuple[Path, Path]:
    """The SmolLM2 policy directory and a reward model with an untrained, seeded head."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    from app.ml.loading import resolve_model_dir

    policy = Path(resolve_model_dir("smollm2", ROOT / "var" / "artifacts"))
    rm_dir = WORK / "smollm2-rm-untrained-head"
    if not (rm_dir / "config.json").exists():
        lm = AutoModelForCausalLM.from_pretrained(str(policy))
        tokenizer = AutoTokenizer.from_pretrained(str(policy))
        config = lm.config
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(0)
        rm = LlamaForSequenceClassification(config)
        rm.model.load_state_dict(lm.model.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=WORK, prefix=".rm."))
        rm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, rm_dir)
    return policy, rm_dir


def run_variant(python: Path, impl: str, lora: bool, policy: Path, rm: Path, quick: bool) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", impl]
    cmd += ["--policy", str(policy), "--reward", str(rm)]
    cmd += ["--lora"] if lora else []
    cmd += ["--quick"] if quick else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    result: dict = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - started
    return result


def markdown(results: list[dict], s: dict[str, Any], quick: bool, seconds: float) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    mem = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    lines = [
        "## PPO",
        "",
        "`bench/ppo.py`: SmolLM2-135M-Instruct policy; reward model = SmolLM2-135M backbone with",
        "an **untrained** scalar head (scores are meaningless; throughput and memory are what is",
        "measured); value model initialised from it. Ours (`app/ml/ppo.py`) vs TRL 1.12",
        "`trl.experimental.ppo.PPOTrainer` (last release with PPO) in its own virtual environment,",
        "same prompts (HH-RLHF harmless-base test, first human turns) and settings.",
        "",
        f"Command: `.venv/bin/python bench/ppo.py{' --quick' if quick else ''} --write-docs`"
        f" ({'quick smoke settings, not the comparison' if quick else 'full settings'}).",
        f"Machine: {device}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"{platform.python_version()}, torch {torch.__version__}. Total wall time "
        f"{seconds / 60:.1f} min.",
        f"Settings: batch {s['batch']} prompts, micro-batch {s['micro']}, {s['epochs']} PPO "
        f"epoch(s), up to {s['new_tokens']} new tokens, prompts cut to {s['prompt_tokens']} "
        f"tokens, temperature {COMMON['temperature']}, {s['steps']} step(s)"
        f"{' (first one left out as warm-up)' if s['steps'] > 1 else ''}; LoRA r={LORA['r']}.",
        "",
        f"| implementation | LoRA | rollout tokens/s | update samples/s | step s | {mem} GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        name = "Verdict" if r["impl"] == "ours" else f"TRL {r.get('trl_version', '1.12')}"
        if "error" in r:
            lines.append(f"| {name} | {'yes' if r['lora'] else 'no'} | failed | | | |")
            continue
        lines.append(
            f"| {name} | {'yes' if r['lora'] else 'no'} | {r['rollout_tokens_per_s']:.1f} | "
            f"{r['update_samples_per_s']:.2f} | {r['step_s']:.1f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} |"
        )
    lines.append("")
    for lora in (False, True):
        pair = {r["impl"]: r for r in results if r["lora"] == lora and "error" not in r}
        if {"ours", "trl"} <= set(pair):
            o, t = pair["ours"], pair["trl"]
            lines.append(
                f"- {'LoRA' if lora else 'Full fine-tuning'}: rollout "
                f"{o['rollout_tokens_per_s'] / t['rollout_tokens_per_s']:.2f}x TRL, update "
                f"{o['update_samples_per_s'] / t['update_samples_per_s']:.2f}x TRL, memory "
                f"{o['peak_memory_bytes'] / t['peak_memory_bytes']:.2f}x TRL."
            )
    errors = [r for r in results if "error" in r]
    for r in errors:
        lines.append(f"- {r['impl']} (LoRA {r['lora']}) failed: `{r['error'][-300:]!r}`")
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace (or append) the `## PPO` section of docs/benchmarks.md, leaving others alone."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## PPO\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--skip-trl", action="store_true", help="only our implementation")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    WORK.mkdir(parents=True, exist_ok=True)

    if args.worker:
        result = (run_ours if args.worker == "ours" else run_trl)(args, settings)
        print("RESULT " + json.dumps(result), flush=True)
        return

    started = time.perf_counter()
    policy, rm = ensure_models()
    pythons = {"ours": Path(sys.executable)}
    if not args.skip_trl:
        pythons["trl"] = ensure_trl_venv()
    results = []
    for lora in (False, True):
        for impl, python in pythons.items():
            print(f"running {impl} (LoRA {lora}) ...", flush=True)
            r = run_variant(python, impl, lora, policy, rm, args.quick)
            r.update(impl=impl, lora=lora)
            print(json.dumps(r), flush=True)
            results.append(r)
    section = markdown(results, settings, args.quick, time.perf_counter() - started)
    print(section)
    if args.write_docs:
        write_section(section)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
