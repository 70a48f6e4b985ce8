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
Each implementation runs `--rounds` times per setting (default 2), alternating which goes first,
and the verdict takes the median of the rounds' ratios: on a shared machine memory bandwidth
drifts by several percent from one run to the next.

Figures:
- rollout tokens/s: real response tokens (up to the first EOS) per second of the rollout
  phase: sampling plus the policy, reference, value and reward forward passes.
- update samples/s: responses x PPO epochs per second of the update phase (the clipped policy
  and value losses, backward, optimizer steps).
The first step is a warm-up and is left out when more than one step runs.

Learning efficiency (`--learning`, its own `## Learning efficiency` section; `--quick` is a
smoke run that never writes the docs):

    .venv/bin/python bench/ppo.py --learning --quick              # end to end, tiny (minutes)
    .venv/bin/python bench/ppo.py --learning --write-docs         # ours RLOO vs TRL's PPO
    .venv/bin/python bench/ppo.py --learning --algorithm ppo      # ours PPO (or grpo) instead

It asks whether our default algorithm gets at least twice TRL's reward gain per CPU-second.
The reward model is a real one, trained once by Verdict's fast `last_n` mode on the first HH-RLHF
harmless-base pairs and cached under `var/bench/ppo/learning/`, because a gain against an
untrained head would mean nothing. The policy prompts are first human turns from later in the
same file, so they do not overlap those pairs. They are kept only when the templated prompt fits
in the token limit, so neither implementation cuts a prompt. They split into a training set and
a disjoint held-out set. Both implementations train with LoRA and get the same learning rate,
response length, temperature, KL coefficient and missing-EOS penalty, and the same budget of
sampled training responses (RLOO: steps x prompts x K; PPO: steps x batch). Equal samples keep
the sampler's and the reward model's work equal, so the comparison measures what each algorithm
gets out of a sample and what its update costs. Each trained policy (TRL's with its adapters
merged) is then evaluated in a separate process by one code path (`learn_eval`): sampled
answers to the held-out prompts with a fixed seed, scored by the reward model, and the KL to
the base on those answers. The gain is the trained policy's mean minus the base's, paired by
prompt. The CPU figure is user + sys time of the training call inside the training process.
Ours and TRL run back to back, alternating which goes first (`--rounds`). Each pair's ratio of
gain per CPU-second is reported. A pair where either gain is not positive is reported plainly,
with no ratio, and the verdict is the median ratio.
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "var" / "bench-venv-trl112"
WORK = ROOT / "var" / "bench" / "ppo"
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

FULL = {"steps": 5, "batch": 4, "micro": 2, "epochs": 2, "new_tokens": 32, "prompt_tokens": 96}
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


class PhaseClock:
    """Wall and CPU time of each step's rollout and update phases, and its response tokens.

    Both implementations are timed at the same boundaries: the rollout starts at the first
    sampling call of a step, the update at the first forward pass with gradients (TRL) or the
    update function (ours), and the step ends when the update has finished.
    """

    def __init__(self) -> None:
        self.rollout: list[tuple[float, float]] = []
        self.update: list[tuple[float, float]] = []
        self.tokens: list[int] = []
        self._rollout_start: tuple[float, float] | None = None
        self._update_start: tuple[float, float] | None = None
        self._step_tokens = 0

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def sampling_starts(self) -> None:
        """Called before every sampling call; the step's first one starts its rollout."""
        if self._rollout_start is None:
            self._rollout_start = self.now()

    def sampled(self, tokens: int) -> None:
        self._step_tokens += tokens

    def update_started(self) -> None:
        if self._update_start is None and self._rollout_start is not None:
            self._update_start = self.now()

    def step_ended(self) -> None:
        end = self.now()
        assert self._rollout_start is not None and self._update_start is not None
        r, u = self._rollout_start, self._update_start
        self.rollout.append((u[0] - r[0], u[1] - r[1]))
        self.update.append((end[0] - u[0], end[1] - u[1]))
        self.tokens.append(self._step_tokens)
        self._rollout_start = self._update_start = None
        self._step_tokens = 0

    def summary(self, s: dict[str, Any]) -> dict[str, Any]:
        """Throughput over the measured steps (the first is a warm-up when there are several)."""
        skip = 1 if len(self.update) > 1 else 0
        rollout, update, tokens = self.rollout[skip:], self.update[skip:], self.tokens[skip:]
        samples = s["batch"] * s["epochs"] * len(update)
        return {
            "rollout_tokens_per_s": sum(tokens) / sum(w for w, _ in rollout),
            "rollout_tokens_per_cpu_s": sum(tokens) / sum(c for _, c in rollout),
            "update_samples_per_s": samples / sum(w for w, _ in update),
            "update_samples_per_cpu_s": samples / sum(c for _, c in update),
            "step_s": (sum(w for w, _ in rollout) + sum(w for w, _ in update)) / len(update),
            "mean_response_tokens": sum(tokens) / (len(tokens) * s["batch"]),
            "peak_memory_bytes": peak_memory_bytes(),
        }


def real_tokens(responses: Any, eos: int) -> int:
    """Response tokens up to and including the first EOS, summed over rows."""
    total = 0
    for row in responses.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


# ---- worker: ours ----------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, s: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch

    from app.ml import ppo, rollout

    torch.set_num_threads(args.threads)
    config = ppo.PPOConfig(
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
    clock = PhaseClock()
    original_sample, original_update = rollout.sample_responses, ppo._ppo_update

    def timed_sample(*a: Any, **kw: Any) -> Any:
        clock.sampling_starts()
        out = original_sample(*a, **kw)
        clock.sampled(real_tokens(out[0], a[5]))  # a[5]: eos_token_id
        return out

    def timed_update(*a: Any, **kw: Any) -> Any:
        clock.update_started()
        out = original_update(*a, **kw)
        clock.step_ended()
        return out

    rollout.sample_responses, ppo._ppo_update = timed_sample, timed_update
    scratch = Path(tempfile.mkdtemp(dir=WORK, prefix="ours."))
    try:
        ppo.train_ppo(
            config,
            args.policy,
            args.reward,
            load_prompts(s["batch"] * s["steps"]),
            scratch / "out",
            scratch / "ckpt",
            None,
            resume=False,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return clock.summary(s)


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

    torch.set_num_threads(args.threads)
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

    clock = PhaseClock()
    original_generation, original_forward = module.batch_generation, module.forward

    def timed_generation(model: Any, queries: Any, *rest: Any, **kw: Any) -> Any:
        clock.sampling_starts()
        out = original_generation(model, queries, *rest, **kw)
        clock.sampled(real_tokens(out[0][:, queries.shape[1] :], eos))
        return out

    def timed_forward(model: Any, *rest: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled():
            clock.update_started()
        return original_forward(model, *rest, **kw)

    module.batch_generation, module.forward = timed_generation, timed_forward

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.step_ended()

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
    result = clock.summary(s)
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


def run_variant(
    python: Path, impl: str, lora: bool, policy: Path, rm: Path, args: argparse.Namespace
) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", impl]
    cmd += ["--threads", str(args.threads)]
    cmd += ["--policy", str(policy), "--reward", str(rm)]
    cmd += ["--lora"] if lora else []
    cmd += ["--quick"] if args.quick else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    result: dict = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - started
    return result


def markdown(
    results: list[dict], s: dict[str, Any], args: argparse.Namespace, seconds: float
) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    mem = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    flags = " --quick" if args.quick else ""
    rounds = 1 + max((r.get("round", 0) for r in results), default=0)
    lines = [
        "## PPO",
        "",
        "`bench/ppo.py`: SmolLM2-135M-Instruct policy; reward model = SmolLM2-135M backbone with",
        "an **untrained** scalar head (scores are meaningless; throughput and memory are what is",
        "measured); value model initialised from it. Ours (`app/ml/ppo.py`) vs TRL 1.12",
        "`trl.experimental.ppo.PPOTrainer` (last release with PPO) in its own virtual environment,",
        "same prompts (HH-RLHF harmless-base test, first human turns) and settings. Each variant",
        "runs in its own process; both are timed at the same phase boundaries.",
        "",
        f"Command: `.venv/bin/python bench/ppo.py{flags} --write-docs`"
        f" ({'quick smoke settings, not the comparison' if args.quick else 'full settings'}).",
        f"Machine: {device}, {os.cpu_count()} CPU cores shared with other jobs, so each run uses "
        f"{args.threads} torch thread(s) and throughput is also given per CPU-second, which "
        f"contention changes far less than wall time. Python {platform.python_version()}, torch "
        f"{torch.__version__}. Total wall time {seconds / 60:.1f} min.",
        f"Settings: batch {s['batch']} prompts, micro-batch {s['micro']}, {s['epochs']} PPO "
        f"epoch(s), up to {s['new_tokens']} new tokens, prompts cut to {s['prompt_tokens']} "
        f"tokens, temperature {COMMON['temperature']}, {s['steps']} step(s)"
        f"{' (the first left out as warm-up)' if s['steps'] > 1 else ''}; LoRA r={LORA['r']} on "
        f"all linear layers. {rounds} run(s) of each implementation per setting, alternating "
        "which goes first; the verdict takes the median of the runs' ratios.",
        "",
        "| run | implementation | LoRA | rollout tok/s | rollout tok/CPU-s | update samples/s | "
        f"update samples/CPU-s | step s | {mem} GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = "Verdict" if r["impl"] == "ours" else f"TRL {r.get('trl_version', '1.12')}"
        uses_lora = "yes" if r["lora"] else "no"
        run = r.get("round", 0) + 1
        if "error" in r:
            lines.append(f"| {run} | {name} | {uses_lora} | failed | | | | | |")
            continue
        lines.append(
            f"| {run} | {name} | {uses_lora} | {r['rollout_tokens_per_s']:.2f} | "
            f"{r['rollout_tokens_per_cpu_s']:.2f} | {r['update_samples_per_s']:.3f} | "
            f"{r['update_samples_per_cpu_s']:.3f} | {r['step_s']:.1f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} |"
        )
    lines.append("")
    for lora in (False, True):
        for o, t in pairs(results, lora):

            def ratio(key: str, o: dict = o, t: dict = t) -> str:
                return f"{o[key] / t[key]:.2f}x"

            lines.append(
                f"- {'LoRA' if lora else 'Full fine-tuning'}, run {o.get('round', 0) + 1}, ours /"
                f" TRL: rollout {ratio('rollout_tokens_per_s')} (per CPU-s "
                f"{ratio('rollout_tokens_per_cpu_s')}), update {ratio('update_samples_per_s')} "
                f"(per CPU-s {ratio('update_samples_per_cpu_s')}), memory "
                f"{ratio('peak_memory_bytes')}."
            )
    for r in results:
        if "error" in r:
            lines.append(f"- {r['impl']} (LoRA {r['lora']}) failed: `{r['error'][-300:]!r}`")
    lines += ["", target_line(results, s), "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "Reading the figures: wall-clock rates move with whatever else the shared cores run; the",
    "per-CPU-second rates count only this process's work and are the steadier comparison.",
    "The rollout phase runs from the start of the step's first sampling call (sampling, then",
    "the reference, value and reward passes) to the start of the update.",
    "Both implementations keep the sampler's log-probabilities as pi_old. Ours asks the model",
    "for logits at response positions only, where TRL computes them for every position;",
    "with LoRA, ours makes the value model the reward model plus adapters (the reward is read",
    "with the adapters off), while TRL keeps a full trainable value model and a separate",
    "reward model, which is where most of the LoRA memory difference comes from. With LoRA,",
    "ours samples from a merged copy of the policy (W + BA, rewritten from the base before",
    "each rollout) instead of through the adapter layers. Each of our micro-batches drops the",
    "columns that are padding in all of its rows (exact: padding is masked). Ours samples a",
    "Llama model through `app.ml.decode.LlamaDecoder`: the same layers computed from the",
    "model's weights with a preallocated KV cache, without the generic forward's per-step",
    "overhead; TRL calls `generate`. Ours runs the",
    "value pass of the first minibatch once, with gradients, at the rollout, and epoch one",
    "trains on it (the weights have not moved yet), where TRL runs it twice. Ours adds the",
    "gradients of the 49152 x 576 matrices (the tied embedding and output projection, the",
    "value model's embedding) in place into buffers kept between steps (`app.ml.vocab_grads`),",
    "where autograd gives every use a fresh full-size tensor. TRL infers padding from the pad",
    "id, which for SmolLM2 equals EOS; this changes what it trains on, not its speed.",
]


def pairs(results: list[dict], lora: bool) -> list[tuple[dict, dict]]:
    """(ours, TRL) of each round that both finished, for one LoRA setting."""
    found = []
    for n in sorted({r.get("round", 0) for r in results}):
        pair = {
            r["impl"]: r
            for r in results
            if r["lora"] == lora and r.get("round", 0) == n and "error" not in r
        }
        if {"ours", "trl"} <= set(pair):
            found.append((pair["ours"], pair["trl"]))
    return found


def target_line(results: list[dict], s: dict[str, Any]) -> str:
    """Issue 6's target: at least 1.3x TRL's throughput at no more memory, per LoRA setting.

    Throughput here is a whole step's CPU time at the same work for both: `batch` responses of
    `new_tokens` tokens sampled and scored, and `batch x epochs` samples updated.
    """
    verdicts = []
    for lora in (False, True):

        def step_cpu_s(r: dict) -> float:
            rollout = s["batch"] * s["new_tokens"] / r["rollout_tokens_per_cpu_s"]
            return rollout + s["batch"] * s["epochs"] / r["update_samples_per_cpu_s"]

        speeds, memories = [], []
        for o, t in pairs(results, lora):
            speeds.append(step_cpu_s(t) / step_cpu_s(o))
            memories.append(o["peak_memory_bytes"] / t["peak_memory_bytes"])
        if not speeds:
            continue
        speed = statistics.median(speeds)
        met = speed >= 1.3 and max(memories) <= 1.0
        each = ""
        if len(speeds) > 1:
            each = " (rounds: " + ", ".join(f"{x:.2f}x" for x in speeds) + ")"
        verdicts.append(
            f"{'LoRA' if lora else 'full fine-tuning'}: a step costs TRL {speed:.2f}x our CPU "
            f"time{' (median)' if len(speeds) > 1 else ''}{each}, memory at most "
            f"{max(memories):.2f}x TRL's: **{'met' if met else 'not met'}**"
        )
    if not verdicts:
        return "Target (at least 1.3x TRL's throughput at no more memory): no comparison ran."
    return "Target (at least 1.3x TRL's throughput at no more memory): " + "; ".join(verdicts) + "."


# ---- learning efficiency (`--learning`) ------------------------------------------------------

LEARN_WORK = WORK / "learning"
# Below this validation accuracy the section says the reward model is near chance.
USEFUL_RM_ACCURACY = 0.6
LEARN_FULL = {
    "rm_pairs": 256, "rm_val_pairs": 64, "rm_max_length": 384, "rm_layers": 4,
    "train_prompts": 64, "eval_prompts": 32, "eval_answers": 2, "responses": 128,
    "group_prompts": 4, "k": 4, "ppo_batch": 8, "micro": 4, "ppo_epochs": 4,
    "new_tokens": 48, "prompt_tokens": 96, "learning_rate": 1e-4,
}  # fmt: skip
LEARN_QUICK = {
    "rm_pairs": 16, "rm_val_pairs": 8, "rm_max_length": 256, "rm_layers": 2,
    "train_prompts": 8, "eval_prompts": 4, "eval_answers": 1, "responses": 8,
    "group_prompts": 2, "k": 2, "ppo_batch": 4, "micro": 2, "ppo_epochs": 1,
    "new_tokens": 16, "prompt_tokens": 64, "learning_rate": 1e-4,
}  # fmt: skip
# Policy prompts come from the end of the file, reward-model pairs from its start: disjoint.
PROMPTS_FROM = 1200


def steps_for(algorithm: str, s: dict[str, Any]) -> int:
    """Training steps that sample `s["responses"]` answers: K per prompt for RLOO and GRPO,
    one per prompt for PPO."""
    per_step = s["group_prompts"] * s["k"] if algorithm in ("rloo", "grpo") else s["ppo_batch"]
    if s["responses"] % per_step or per_step % s["micro"]:
        raise ValueError(
            f"{algorithm}: {s['responses']} responses are not whole steps of {per_step}, or"
            f" micro-batch {s['micro']} does not divide a step"
        )
    return s["responses"] // per_step


def learning_prompts(tokenizer: Any, s: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out prompts: distinct first human turns of HH-RLHF transcripts
    from index `PROMPTS_FROM` on, kept only when the chat-templated prompt fits in
    `prompt_tokens` (so neither implementation cuts a prompt, and both see the same tokens)."""
    needed = s["train_prompts"] + s["eval_prompts"]
    seen: set[str] = set()
    prompts: list[str] = []
    with gzip.open(HH_RLHF, "rt") as f:
        for index, line in enumerate(f):
            if index < PROMPTS_FROM:
                continue
            match = re.search(r"Human: (.*?)\n\nAssistant:", json.loads(line)["chosen"], re.S)
            text = match.group(1).strip() if match else ""
            if not text or text in seen:
                continue
            templated = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            if (
                len(tokenizer(templated, add_special_tokens=False)["input_ids"])
                > s["prompt_tokens"]
            ):
                continue
            seen.add(text)
            prompts.append(text)
            if len(prompts) == needed:
                return prompts[: s["train_prompts"]], prompts[s["train_prompts"] :]
    raise ValueError(f"{HH_RLHF} has only {len(prompts)} usable prompts, {needed} needed")


def ensure_learning_rm(policy: Path, s: dict[str, Any], threads: int) -> tuple[Path, dict]:
    """A reward model that means something, trained once and cached: Verdict's fast `last_n`
    mode on the first `rm_pairs` HH-RLHF harmless-base pairs (indices below `PROMPTS_FROM`),
    accuracy on the next `rm_val_pairs`. Returns its directory and its training info."""
    import torch
    from reward_model import load_pairs, to_examples

    from app.ml.reward import RewardConfig, train_reward_model

    name = f"rm-hh-{s['rm_pairs']}p-{s['rm_max_length']}t-last{s['rm_layers']}"
    out = LEARN_WORK / name
    info_path = out / "bench_info.json"
    if info_path.exists():
        return out, json.loads(info_path.read_text())
    pairs = [p for p in load_pairs(HH_RLHF) if p["prompt"] is not None]
    train = [p for p in pairs if p["index"] < PROMPTS_FROM][: s["rm_pairs"]]
    val = [p for p in pairs if p["index"] < PROMPTS_FROM][s["rm_pairs"] :][: s["rm_val_pairs"]]
    torch.set_num_threads(threads)
    config = RewardConfig(
        backbone=str(policy),
        max_length=s["rm_max_length"],
        train_mode="last_n",
        last_n_layers=s["rm_layers"],
        learning_rate=1e-4,
        batch_size=8,
        epochs=1,
        seed=SEED,
    )
    print(f"training the reward model ({len(train)} pairs, cached as {out}) ...", flush=True)
    started, cpu = time.perf_counter(), time.process_time()
    tmp = Path(tempfile.mkdtemp(dir=LEARN_WORK, prefix=".rm."))
    result = train_reward_model(config, to_examples(train), to_examples(val), tmp / "model")
    info = {
        "train_pairs": result.train_pairs,
        "val_pairs": result.val_pairs,
        "val_accuracy": result.final_metrics.get("accuracy/val", result.best_val_accuracy),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
    }
    (tmp / "model" / "bench_info.json").write_text(json.dumps(info, indent=2))
    os.replace(tmp / "model", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out, info


def learn_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with our RLOO, GRPO or PPO (LoRA) under the shared settings; save the policy."""
    sys.path.insert(0, str(ROOT))
    import torch

    s, algorithm = spec["settings"], spec["algorithm"]
    steps = steps_for(algorithm, s)
    common = {
        "seed": SEED,
        "total_steps": steps,
        "learning_rate": s["learning_rate"],
        "max_prompt_length": s["prompt_tokens"],
        "max_new_tokens": s["new_tokens"],
        "temperature": COMMON["temperature"],
        "kl_coef": COMMON["kl_coef"],
        "missing_eos_penalty": COMMON["missing_eos_penalty"],
        "use_lora": True,
        "lora_r": LORA["r"],
        "lora_alpha": LORA["alpha"],
        "sample_every": 10**6,
        "checkpoint_every": 10**6,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    scratch = Path(tempfile.mkdtemp(dir=LEARN_WORK, prefix="ours."))
    torch.set_num_threads(spec["threads"])
    started, cpu = time.perf_counter(), time.process_time()
    if algorithm in ("rloo", "grpo"):
        from app.kinds.critic_free import CriticFreeConfig
        from app.ml.critic_free import train_critic_free

        answers = s["group_prompts"] * s["k"]
        config = CriticFreeConfig(
            **common,
            estimator=algorithm,
            # Each paper's placement (app.kinds.critic_free): RLOO in the reward, GRPO in the loss.
            kl_placement="reward" if algorithm == "rloo" else "loss",
            batch_size=s["group_prompts"],
            num_generations=s["k"],
            mini_batch_size=answers,
            gradient_accumulation_steps=answers // s["micro"],
            epochs=1,
            rollout_forward_batch_size=answers,
        )
        result: Any = train_critic_free(
            config, spec["policy"], spec["reward"], spec["prompts"], spec["out"],
            scratch / "ckpt", None, resume=False,
        )  # fmt: skip
    else:
        from app.ml import ppo

        ppo_config = ppo.PPOConfig(
            **common,
            batch_size=s["ppo_batch"],
            mini_batch_size=s["ppo_batch"],
            gradient_accumulation_steps=s["ppo_batch"] // s["micro"],
            ppo_epochs=s["ppo_epochs"],
            rollout_forward_batch_size=s["ppo_batch"],
        )
        result = ppo.train_ppo(
            ppo_config, spec["policy"], spec["reward"], spec["prompts"], spec["out"],
            scratch / "ckpt", None, resume=False,
        )  # fmt: skip
    out = {
        "train_cpu_s": time.process_time() - cpu,
        "train_wall_s": time.perf_counter() - started,
        "steps": steps,
        "final_train_score": result.metrics.get("objective/scores"),
        "peak_memory_bytes": peak_memory_bytes(),
    }
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def learn_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL 1.12's PPOTrainer (LoRA) under the shared settings; save the policy with
    the adapters merged, so our evaluation code loads it like ours."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = spec["settings"]
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    started, cpu = time.perf_counter(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt_ids = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in spec["prompts"]
    ]
    dataset = Dataset.from_dict({"input_ids": prompt_ids})
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"])
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1)
    scratch = Path(tempfile.mkdtemp(dir=LEARN_WORK, prefix="trl."))
    config = PPOConfig(
        output_dir=str(scratch),
        seed=SEED,
        per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=s["ppo_batch"] // s["micro"],
        num_mini_batches=1,
        num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["responses"],
        local_rollout_forward_batch_size=s["ppo_batch"],
        learning_rate=s["learning_rate"],
        response_length=s["new_tokens"],
        temperature=COMMON["temperature"],
        kl_coef=COMMON["kl_coef"],
        missing_eos_penalty=COMMON["missing_eos_penalty"],
        stop_token="eos",
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset,
        peft_config=peft_config,
    )
    trainer.train()
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - started
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    trained = trainer.accelerator.unwrap_model(trainer.model).policy.merge_and_unload()
    trained.save_pretrained(spec["out"])
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(spec["out"])
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "train_cpu_s": train_cpu,
        "train_wall_s": train_wall,
        "steps": int(trainer.state.global_step),
        "final_train_score": scores[-1] if scores else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "trl_version": trl.__version__,
    }


def learn_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """The one evaluation every policy gets: `eval_answers` sampled answers per held-out prompt
    (`generate_responses`, fixed seed, training temperature, no nucleus cut), scored by the
    reward model (`RewardModelScorer`), and, for a trained policy, the KL to the base policy
    estimated on those answers (mean over answers of the summed log-ratio at the temperature)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from app.kinds.generate import SamplingConfig
    from app.ml.generation import encode_prompt, generate_responses
    from app.ml.loading import load_tokenizer
    from app.ml.policy import forward_logprobs, load_policy
    from app.ml.reward import RewardModelScorer, load_reward_model

    s = spec["settings"]
    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(spec["policy"])
    model = load_policy(spec["policy"], torch.float32, device)
    sampling = SamplingConfig(
        num_responses=s["eval_answers"],
        temperature=COMMON["temperature"],
        top_p=1.0,
        max_new_tokens=s["new_tokens"],
        batch_size=16,
        do_sample=True,
        seed=SEED,
    )
    answers = generate_responses((model, tokenizer), spec["prompts"], sampling)
    rm = load_reward_model(spec["reward"], device)
    scorer = RewardModelScorer(rm.model, rm.tokenizer, rm.max_length, 16)
    messages = [
        [{"role": "user", "content": p}]
        for p, group in zip(spec["prompts"], answers, strict=True)
        for _ in group
    ]
    flat = [a for group in answers for a in group]
    scores = scorer(messages, [a.text for a in flat], device).tolist()
    k = s["eval_answers"]
    per_prompt = [statistics.fmean(scores[i : i + k]) for i in range(0, len(scores), k)]
    out: dict[str, Any] = {
        "per_prompt": per_prompt,
        "mean_score": statistics.fmean(per_prompt),
        "truncated": sum(a.truncated for a in flat) / len(flat),
        "mean_tokens": statistics.fmean(a.num_tokens for a in flat),
    }
    if spec.get("base"):
        base = load_policy(spec["base"], torch.float32, device)
        kls = []
        with torch.no_grad():
            for prompt, group in zip(spec["prompts"], answers, strict=True):
                context = encode_prompt(tokenizer, prompt)
                for a in group:
                    ids = torch.tensor([context + a.token_ids], device=device)
                    mask = torch.ones_like(ids)
                    lp = [
                        forward_logprobs(m, ids, mask, len(context), COMMON["temperature"])[0]
                        for m in (model, base)
                    ]
                    kls.append(float((lp[0] - lp[1]).sum()))
        out["kl_to_base"] = statistics.fmean(kls)
    return out


def run_learning_worker(python: Path, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one `--worker learn-*` process; adds its wall time and its whole CPU time (user +
    sys, from RUSAGE_CHILDREN: imports and loading included)."""
    LEARN_WORK.mkdir(parents=True, exist_ok=True)
    fd, spec_path = tempfile.mkstemp(dir=LEARN_WORK, prefix=".spec.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", kind, "--spec", spec_path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    finally:
        os.unlink(spec_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-3000:]}"}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    result["process_wall_s"] = time.perf_counter() - started
    result["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime
    )
    return result


def learning_main(args: argparse.Namespace) -> None:
    """Train a reward model once, evaluate the base policy once, then per round train ours and
    TRL's back to back (alternating which goes first), each followed by the same evaluation."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from app.ml.loading import resolve_model_dir

    s = LEARN_QUICK if args.quick else LEARN_FULL
    for algorithm in (args.algorithm, "ppo"):
        steps_for(algorithm, s)
    results_path = LEARN_WORK / ("results-quick.json" if args.quick else "results.json")
    if args.render_only:
        saved = json.loads(results_path.read_text())
        section = learning_markdown(saved, s, args)
        print(section)
        if args.write_docs:
            write_section(LEARNING_HEADING, section)
        return
    started = time.perf_counter()
    LEARN_WORK.mkdir(parents=True, exist_ok=True)
    policy = Path(resolve_model_dir("smollm2", ROOT / "var" / "artifacts"))
    rm, rm_info = ensure_learning_rm(policy, s, max(args.threads, 2))
    train_prompts, eval_prompts = learning_prompts(AutoTokenizer.from_pretrained(policy), s)
    pythons = {"ours": Path(sys.executable)}
    if not args.skip_trl:
        pythons["trl"] = ensure_trl_venv()

    def evaluate(policy_dir: Path, base: Path | None) -> dict[str, Any]:
        spec = {
            "settings": s,
            "threads": args.threads,
            "policy": str(policy_dir),
            "reward": str(rm),
            "prompts": eval_prompts,
            "base": str(base) if base else None,
        }
        return run_learning_worker(pythons["ours"], "learn-eval", spec)

    print("evaluating the base policy ...", flush=True)
    base_eval = evaluate(policy, None)
    if "error" in base_eval:
        raise SystemExit(f"base evaluation failed: {base_eval['error']}")
    runs: list[dict[str, Any]] = []
    for n in range(1 if args.quick else args.rounds):
        order = list(pythons.items())
        for impl, python in order if n % 2 == 0 else order[::-1]:
            algorithm = args.algorithm if impl == "ours" else "ppo"
            out = LEARN_WORK / f"policy-{impl}-{algorithm}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"training {impl} {algorithm} (run {n + 1}) ...", flush=True)
            spec = {
                "settings": s,
                "threads": args.threads,
                "policy": str(policy),
                "reward": str(rm),
                "prompts": train_prompts,
                "out": str(out),
                "algorithm": algorithm,
            }
            run = run_learning_worker(python, f"learn-{impl}", spec)
            run.update(impl=impl, algorithm=algorithm, round=n)
            if "error" not in run:
                print(f"evaluating {impl} {algorithm} (run {n + 1}) ...", flush=True)
                run["eval"] = evaluate(out, policy)
                if "error" in run["eval"]:
                    run["error"] = "evaluation: " + run["eval"]["error"]
            shutil.rmtree(out, ignore_errors=True)
            print(json.dumps({k: v for k, v in run.items() if k != "eval"}), flush=True)
            runs.append(run)
    saved = {
        "runs": runs,
        "base": base_eval,
        "rm": rm_info,
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
        "algorithm": args.algorithm,
    }
    results_path.write_text(json.dumps(saved, indent=2))
    section = learning_markdown(saved, s, args)
    print(section)
    if args.write_docs:
        write_section(LEARNING_HEADING, section)
    if any("error" in r for r in runs):
        sys.exit(1)


LEARNING_HEADING = "## Learning efficiency"


def gain_of(run: dict[str, Any], base: dict[str, Any]) -> tuple[float, float]:
    """Reward gain over the base on the held-out prompts, and its standard error from the
    per-prompt differences (the same prompts and seed for both, so the pairing removes most of
    the prompts' own spread)."""
    diffs = [t - b for t, b in zip(run["eval"]["per_prompt"], base["per_prompt"], strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se


def pair_ratio(ours: dict[str, Any], trl: dict[str, Any], base: dict[str, Any]) -> str | float:
    """Ours' gain per training CPU-second over TRL's, or why there is no meaningful ratio."""
    g_o, g_t = gain_of(ours, base)[0], gain_of(trl, base)[0]
    if g_t <= 0:
        return f"no ratio: TRL's gain is {g_t:+.3f} (not positive)"
    if g_o <= 0:
        return f"no ratio: our gain is {g_o:+.3f} (not positive); TRL's is {g_t:+.3f}"
    return (g_o / ours["train_cpu_s"]) / (g_t / trl["train_cpu_s"])


def learning_markdown(saved: dict[str, Any], s: dict[str, Any], args: argparse.Namespace) -> str:
    """The `## Learning efficiency` section: settings, one row per run, pair ratios, verdict."""
    import torch

    runs, base, rm = saved["runs"], saved["base"], saved["rm"]
    algorithm = saved["algorithm"]
    ours_steps, trl_steps = steps_for(algorithm, s), steps_for("ppo", s)
    ours_shape = (
        f"{ours_steps} steps x {s['group_prompts']} prompts x K={s['k']}"
        if algorithm in ("rloo", "grpo")
        else f"{ours_steps} steps x batch {s['ppo_batch']}, {s['ppo_epochs']} PPO epochs"
    )
    flags = (" --quick" if args.quick else "") + (
        f" --algorithm {algorithm}" if algorithm != "rloo" else ""
    )
    lines = [
        LEARNING_HEADING,
        "",
        f"`bench/ppo.py --learning{flags}`: reward gain per CPU-second of training, Verdict's"
        f" {algorithm.upper()} vs TRL 1.12's `PPOTrainer`, both with LoRA (r={LORA['r']},"
        f" alpha={LORA['alpha']}, all linear layers) on SmolLM2-135M-Instruct.",
        "",
        f"Reward model (the same for both): SmolLM2-135M-Instruct trained by Verdict's `last_n`"
        f" mode (top {s['rm_layers']} layers) on the first {rm['train_pairs']} HH-RLHF"
        f" harmless-base pairs, max length {s['rm_max_length']}; accuracy"
        f" {rm['val_accuracy']:.3f} on the next {rm['val_pairs']} pairs"
        f" ({rm['wall_s']:.0f} s to train, cached under `var/bench/ppo/learning/`).",
        f"Prompts: first human turns from index {PROMPTS_FROM} of the same file on (disjoint from"
        f" the reward model's pairs) that fit in {s['prompt_tokens']} tokens:"
        f" {s['train_prompts']} for training, the next {s['eval_prompts']} held out.",
        f"Same for both: learning rate {s['learning_rate']:g}, up to {s['new_tokens']} new tokens,"
        f" temperature {COMMON['temperature']}, KL coefficient {COMMON['kl_coef']},"
        f" missing-EOS penalty {COMMON['missing_eos_penalty']}, and the same budget of"
        f" {s['responses']} sampled training responses: ours {ours_shape}; TRL {trl_steps} steps"
        f" x batch {s['ppo_batch']}, {s['ppo_epochs']} PPO epochs. The same number of samples"
        " (not the same wall time) keeps the reward model's and the sampler's work equal, so"
        " what differs is what each algorithm does with a sample and what its update costs.",
        f"Evaluation (one code path for every policy, in its own process): {s['eval_answers']}"
        f" answer(s) per held-out prompt sampled by `generate_responses` (seed {SEED}, same"
        " temperature, no nucleus cut), scored by the reward model; gain = trained mean minus"
        f" base mean (base {base['mean_score']:.3f}, truncated {base['truncated']:.0%}), ± its"
        " standard error over prompts. KL: the trained policy's summed log-ratio to the base on"
        " its own answers. TRL's policy is saved with its adapters merged and evaluated the"
        " same way.",
        f"CPU s: user + sys of the training call inside its process (models loaded, trainer"
        f" built, trained, ours also saved), {saved['threads']} torch thread(s); the whole"
        " process (imports included) is in the last column. Machine:"
        f" {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'},"
        f" {os.cpu_count()} cores shared with other jobs; torch {torch.__version__}. Total"
        f" {saved['seconds'] / 60:.1f} min.",
        "",
        "| run | implementation | gain | KL | truncated | train CPU s | wall s | gain / CPU-ks |"
        " process CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        name = (
            f"Verdict {r['algorithm'].upper()}"
            if r["impl"] == "ours"
            else f"TRL {r.get('trl_version', '1.12')} PPO"
        )
        if "error" in r:
            lines.append(f"| {r['round'] + 1} | {name} | failed | | | | | | |")
            continue
        gain, se = gain_of(r, base)
        e = r["eval"]
        lines.append(
            f"| {r['round'] + 1} | {name} | {gain:+.3f} ± {se:.3f} | {e['kl_to_base']:.2f} |"
            f" {e['truncated']:.0%} | {r['train_cpu_s']:.0f} | {r['train_wall_s']:.0f} |"
            f" {1000 * gain / r['train_cpu_s']:+.3f} | {r['process_cpu_s']:.0f} |"
        )
    lines.append("")
    ratios: list[float] = []
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if "error" not in r:
            by_round.setdefault(r["round"], {})[r["impl"]] = r
    for n, pair in sorted(by_round.items()):
        if {"ours", "trl"} <= set(pair):
            ratio = pair_ratio(pair["ours"], pair["trl"], base)
            if isinstance(ratio, float):
                ratios.append(ratio)
                lines.append(f"- Run {n + 1}: gain per CPU-second, ours / TRL = **{ratio:.2f}x**.")
            else:
                lines.append(f"- Run {n + 1}: {ratio}.")
    for r in runs:
        if "error" in r:
            lines.append(f"- {r['impl']} run {r['round'] + 1} failed: `{r['error'][-300:]!r}`")
    lines.append("")
    pairs_done = sum(1 for p in by_round.values() if {"ours", "trl"} <= set(p))
    # A gain counts as learned when it is at least twice its standard error.
    clear = [r for r in runs if "error" not in r and gain_of(r, base)[0] > 2 * gain_of(r, base)[1]]
    target = "Target (gain per CPU-second at least 2x TRL 1.12's PPO): "
    if args.quick:
        lines.append(target + "not judged: `--quick` is a smoke run of the script.")
    elif not clear:
        lines.append(target + "**not judged**: no gain is clear of its noise (see below).")
    elif not ratios:
        lines.append(target + "no pair gave a meaningful ratio; not judged.")
    else:
        median = statistics.median(ratios)
        caveat = (
            f" ({pairs_done - len(ratios)} of {pairs_done} pairs without a ratio, see above)"
            if len(ratios) < pairs_done
            else ""
        )
        lines.append(
            target + f"median {median:.2f}x over {len(ratios)} pair(s){caveat}:"
            f" **{'met' if median >= 2.0 and len(ratios) == pairs_done else 'not met'}**."
        )
    cpu = [
        pair["trl"]["train_cpu_s"] / pair["ours"]["train_cpu_s"]
        for pair in by_round.values()
        if {"ours", "trl"} <= set(pair)
    ]
    if not clear and cpu and not args.quick:
        weak = (
            f"; the reward model scores {rm['val_accuracy']:.3f} on its validation pairs, near"
            " chance, so there is little for either to learn"
            if rm["val_accuracy"] < USEFUL_RM_ACCURACY
            else ""
        )
        lines += [
            "",
            "No gain above is at least twice its standard error" + weak + ": the ratios compare"
            " noise. What the run does measure is the cost of a sample: TRL's training took"
            f" {', '.join(f'{x:.1f}x' for x in cpu)} our CPU time for the same"
            f" {s['responses']} sampled responses (pair by pair).",
        ]
    lines += [
        "",
        "Reading the figures: with a few hundred samples the gain is small against its standard"
        " error, so a ratio is only as good as both gains are clearly above zero. TRL reads the"
        " reward at the last token before the first pad id, which for SmolLM2 is also EOS, so"
        " during training its reward model sees the answer without its end-of-turn token;"
        " the evaluation scores every policy's answers with the reward model's own chat"
        " rendering.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--skip-trl", action="store_true", help="only our implementation")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default 1: shared cores)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each implementation per setting, alternating which goes first, so a slow"
        " spell of a shared machine falls on both (default 2; the verdict takes the median)",
    )
    parser.add_argument(
        "--only",
        choices=["full", "lora"],
        help="run one setting: full fine-tuning or LoRA (default both)",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="re-render the last saved results, run nothing"
    )
    parser.add_argument(
        "--learning",
        action="store_true",
        help="learning efficiency instead of throughput: reward gain per CPU-second vs TRL's PPO",
    )
    parser.add_argument(
        "--algorithm",
        choices=["rloo", "grpo", "ppo"],
        default="rloo",
        help="--learning: our algorithm (default rloo, the closed loop's default)",
    )
    parser.add_argument(
        "--worker",
        choices=["ours", "trl", "learn-ours", "learn-trl", "learn-eval"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    settings = QUICK if args.quick else FULL
    WORK.mkdir(parents=True, exist_ok=True)
    if args.worker and args.worker.startswith("learn-"):
        spec = json.loads(Path(args.spec).read_text())
        worker = {"learn-ours": learn_ours, "learn-trl": learn_trl, "learn-eval": learn_eval}
        print("RESULT " + json.dumps(worker[args.worker](spec)), flush=True)
        return
    if args.learning:
        if args.quick and args.write_docs:
            parser.error("--learning --quick is a smoke run and does not write the docs")
        if args.only:
            parser.error("--only is for the throughput mode; --learning always uses LoRA")
        learning_main(args)
        return
    if args.algorithm != "rloo":
        parser.error("--algorithm is for --learning (the throughput mode compares PPO)")

    if args.render_only:
        saved = json.loads(
            (WORK / ("results-quick.json" if args.quick else "results.json")).read_text()
        )
        args.threads = saved["threads"]
        section = markdown(saved["results"], settings, args, saved["seconds"])
        print(section)
        if args.write_docs:
            write_section("## PPO", section)
        return
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
    settings_run = {"full": (False,), "lora": (True,), None: (False, True)}[args.only]
    for lora in settings_run:
        for n in range(1 if args.quick else args.rounds):
            order = list(pythons.items())
            for impl, python in order if n % 2 == 0 else order[::-1]:
                print(f"running {impl} (LoRA {lora}, run {n + 1}) ...", flush=True)
                r = run_variant(python, impl, lora, policy, rm, args)
                r.update(impl=impl, lora=lora, round=n)
                print(json.dumps(r), flush=True)
                results.append(r)
    seconds = time.perf_counter() - started
    (WORK / ("results-quick.json" if args.quick else "results.json")).write_text(
        json.dumps({"results": results, "seconds": seconds, "threads": args.threads}, indent=2)
    )
    section = markdown(results, settings, args, seconds)
    print(section)
    if args.write_docs:
        write_section("## PPO", section)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
