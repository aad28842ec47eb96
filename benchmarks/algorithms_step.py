"""Wall time of one training iteration of every algorithm (SFT, DPO, LLMReinforce, LLMPPO, GRPO) on the CPU.

Usage::

    python benchmarks/algorithms_step.py                      # tiny model, 12 measured iterations after 2 warm-up
    python benchmarks/algorithms_step.py --iterations 20 --warmup 3
    python benchmarks/algorithms_step.py --quick              # smoke run (tests/test_benchmarks_algorithms.py)

All five run on the same saved tiny Qwen2 model (``agilerl_llm.testing.save_tiny_model``), fp32, LoRA r=16 /
alpha=32 / dropout 0 on every linear layer but the lm_head, no gradient checkpointing, AdamW, grad clip 1.0,
at a comparable shape of 64 sequences per iteration with 16 trained tokens each:

* SFT: ONE optimizer step on a batch of 64 (prompt, completion) sequences whose completions are 16 tokens
  (15 characters + the closing eos of the chat template; the tiny tokenizer is one token per character);
* DPO: ONE optimizer step on 32 preference pairs (64 sequences, chosen and rejected of 16 completion tokens
  each): a no-grad reference forward, one forward+backward of the policy;
* LLMReinforce, LLMPPO, GRPO: 8 prompts x 8 completions x exactly 16 new tokens (``min_output_tokens =
  max_output_tokens``), sampled with the actor (``get_action``), scored by a cheap reward (``env.step``), then
  ``learn`` with ``batch_size = 64`` and one update epoch, i.e. ONE optimizer step over the 64 completions.
  beta=0.001 (a no-grad reference forward) for all three; LLMPPO also runs its critic adapter + value head.

The prompts are addition questions of one fixed width ("17+35="), so all rows of a batch have the same length.
All agents live in one process and run in lock step: iteration i of every algorithm, with the order rotated
each round, so load from other processes on a shared machine lands on all alike. ``--warmup`` iterations are
dropped, then medians over ``--iterations`` are reported:

* s/iter: wall time of one iteration (SFT/DPO: ``learn`` on a ready batch; RL: ``get_action`` -> ``env.step``
  -> ``learn``);
* generate s: the ``get_action`` call of the RL algorithms (0 for SFT/DPO);
* learn s: s/iter - generate s;
* tokens/iter: trained completion tokens (SFT/DPO: loss-mask tokens of the batch; RL: generated tokens);
* tokens/s: tokens/iter / s/iter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("SFT", "DPO", "LLMReinforce", "LLMPPO", "GRPO")

FULL_SHAPE = {"size": "tiny", "prompts": 8, "group_size": 8, "new_tokens": 16, "warmup": 2, "iterations": 12}
QUICK_SHAPE = {"size": "nano", "prompts": 2, "group_size": 2, "new_tokens": 4, "warmup": 1, "iterations": 2}
SHARED = {
    "threads": 2,
    "lora_r": 16,
    "lora_alpha": 32,
    "beta_rl": 0.001,
    "beta_dpo": 0.1,
    "lr": 1e-5,
    "max_grad_norm": 1.0,
    "temperature": 0.9,
    "top_p": 0.95,
    "top_k": 50,
    "seed": 0,
}


def questions() -> list[dict[str, str]]:
    """Addition questions of one fixed width ("17+35="), so every prompt has the same token length."""
    return [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 100, 7) for b in range(10, 100, 5)]


def digit_fraction(completion: str, answer: str, prompt: str) -> float:
    """The RL reward: the fraction of digit characters (cheap, and not constant over a group)."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def completion_text(index: int, characters: int) -> str:
    """A fixed-length completion (one token per character with the tiny tokenizer)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(alphabet[(index * 7 + i * 3) % len(alphabet)] for i in range(characters))


def _lora_config(config: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


class Runner:
    """One algorithm: ``iterate()`` runs one training iteration and returns its timings."""

    def __init__(self, name: str, agent, step) -> None:
        self.name, self.agent, self._step = name, agent, step

    def iterate(self) -> dict:
        return self._step()


def build_runners(config: dict) -> dict[str, Runner]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO_ROOT))
    from agilerl_llm import GRPO
    from agilerl_llm.algorithms.dpo import DPO
    from agilerl_llm.algorithms.ppo import LLMPPO
    from agilerl_llm.algorithms.reinforce import LLMReinforce
    from agilerl_llm.algorithms.sft import SFT
    from agilerl_llm.envs.preference import PreferenceGym
    from agilerl_llm.envs.reasoning import ReasoningGym
    from agilerl_llm.envs.sft import SFTGym

    model_dir = Path(config["model_dir"])
    if not (model_dir / "config.json").exists():
        from agilerl_llm.testing import save_tiny_model

        save_tiny_model(model_dir, config["size"], architecture="qwen2", seed=config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = config["prompts"] * config["group_size"]  # sequences per iteration, for every algorithm
    chars = config["new_tokens"] - 1  # + the chat template's closing eos = new_tokens trained tokens

    def base(batch_size: int) -> dict:
        return {
            "actor_network": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            "lora_config": _lora_config(config),
            "lr": config["lr"],
            "max_grad_norm": config["max_grad_norm"],
            "batch_size": batch_size,
            "gradient_checkpointing": False,
            "seed": config["seed"],
        }

    data = questions()
    runners: dict[str, Runner] = {}

    # SFT: one optimizer step on a fixed batch of `rows` sequences.
    sft_data = [{"prompt": q["question"], "completion": completion_text(i, chars)} for i, q in enumerate(data)]
    sft_env = SFTGym(sft_data, sft_data[:8], tokenizer, data_batch_size_per_gpu=rows, seed=config["seed"])
    sft = SFT(tokenizer.pad_token_id, tokenizer.pad_token, **base(rows))
    sft_state = {"batch": sft_env.reset()}

    def sft_step() -> dict:
        batch = sft_state["batch"]
        start = time.perf_counter()
        sft.learn(batch)
        end = time.perf_counter()
        sft_state["batch"] = sft_env.advance()  # next batch prepared outside the timed region
        return {"iteration_s": end - start, "generate_s": 0.0, "tokens": int(batch.loss_mask.sum())}

    runners["SFT"] = Runner("SFT", sft, sft_step)

    # DPO: one optimizer step on rows // 2 pairs (= rows sequences).
    pairs = [
        {"prompt": q["question"], "chosen": completion_text(i, chars), "rejected": completion_text(i + 1, chars)}
        for i, q in enumerate(data)
    ]
    dpo_env = PreferenceGym(pairs, pairs[:8], tokenizer, data_batch_size_per_gpu=rows // 2, seed=config["seed"])
    dpo = DPO(tokenizer.pad_token_id, tokenizer.pad_token, beta=config["beta_dpo"], **base(rows // 2))
    dpo_state = {"batch": dpo_env.reset()}

    def dpo_step() -> dict:
        batch = dpo_state["batch"]
        start = time.perf_counter()
        dpo.learn(batch)
        end = time.perf_counter()
        dpo_state["batch"] = dpo_env.advance()
        tokens = int(batch.chosen.loss_mask.sum() + batch.rejected.loss_mask.sum())
        return {"iteration_s": end - start, "generate_s": 0.0, "tokens": tokens}

    runners["DPO"] = Runner("DPO", dpo, dpo_step)

    # The RL algorithms: generation + reward + learn.
    sampling = {
        "group_size": config["group_size"],
        "beta": config["beta_rl"],
        "update_epochs": 1,
        "temperature": config["temperature"],
        "top_p": config["top_p"],
        "top_k": config["top_k"],
        "max_output_tokens": config["new_tokens"],
        "min_output_tokens": config["new_tokens"],
    }
    for name, cls in (("LLMReinforce", LLMReinforce), ("LLMPPO", LLMPPO), ("GRPO", GRPO)):
        agent = cls(tokenizer.pad_token_id, tokenizer.pad_token, **sampling, **base(rows))
        env = ReasoningGym(data, data[:8], tokenizer, digit_fraction, data_batch_size_per_gpu=config["prompts"])
        runners[name] = Runner(name, agent, _rl_step(agent, env))
    return runners


def _rl_step(agent, env):
    state = {"prompts": env.reset()}

    def step() -> dict:
        start = time.perf_counter()
        result = agent.get_action(state["prompts"])
        generated = time.perf_counter()
        state["prompts"], rewards = env.step(result)
        agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
        end = time.perf_counter()
        return {
            "iteration_s": end - start,
            "generate_s": generated - start,
            "tokens": int(result.completion_lengths.sum()),
        }

    return step


def measure(config: dict) -> dict[str, dict]:
    """Iteration i of every algorithm, rotating the order each round; medians after the warm-up."""
    import torch

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    runners = build_runners(config)
    iterations: dict[str, list[dict]] = {name: [] for name in runners}
    order = list(runners)
    total = config["warmup"] + config["iterations"]
    for index in range(total):
        for name in order:
            iterations[name].append(runners[name].iterate())
        order = order[1:] + order[:1]
        times = ", ".join(f"{name} {its[-1]['iteration_s']:.3f}" for name, its in iterations.items())
        print(
            f"round {index + 1}/{total}{' (warm-up)' if index < config['warmup'] else ''}: {times} s", file=sys.stderr
        )
    return {name: summarise(its, config["warmup"]) for name, its in iterations.items()}


def summarise(iterations: list[dict], warmup: int) -> dict:
    measured = iterations[warmup:]
    median_iteration = statistics.median(it["iteration_s"] for it in measured)
    tokens = statistics.median(it["tokens"] for it in measured)
    return {
        "iteration_s": median_iteration,
        "generate_s": statistics.median(it["generate_s"] for it in measured),
        "learn_s": statistics.median(it["iteration_s"] - it["generate_s"] for it in measured),
        "tokens_per_iteration": tokens,
        "tokens_per_s": tokens / median_iteration,
        "iterations": measured,
    }


def format_table(results: dict[str, dict]) -> str:
    header = (
        f"{'algorithm':<13}| {'s/iter':>7} | {'generate s':>10} | {'learn s':>7} | {'tokens/iter':>11} | "
        f"{'tokens/s':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        lines.append(
            f"{name:<13}| {result['iteration_s']:>7.3f} | {result['generate_s']:>10.3f} | {result['learn_s']:>7.3f} | "
            f"{result['tokens_per_iteration']:>11.0f} | {result['tokens_per_s']:>8.0f}"
        )
    return "\n".join(lines)


def _versions() -> str:
    import peft
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="nano model, 2 prompts x 2 x 4 tokens: a smoke run")
    parser.add_argument("--size", help="tiny model size (nano/tiny/small/30m); default tiny (nano with --quick)")
    parser.add_argument("--iterations", type=int, help="measured iterations after warm-up (default 12)")
    parser.add_argument("--warmup", type=int, help="warm-up iterations, not measured (default 2)")
    parser.add_argument("--threads", type=int, help=f"torch threads (default {SHARED['threads']})")
    parser.add_argument("--model-dir", help="reuse (or create) the model folder here instead of a temporary one")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    shape = dict(QUICK_SHAPE if args.quick else FULL_SHAPE)
    for key in ("size", "iterations", "warmup"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if shape["iterations"] < 1 or shape["warmup"] < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--iterations and --threads must be >= 1 and --warmup >= 0")
    shared = SHARED | ({"threads": args.threads} if args.threads else {})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = shape["prompts"] * shape["group_size"]
    print(
        f"One training iteration per algorithm on CPU: {shape['size']} qwen2, {rows} sequences x "
        f"{shape['new_tokens']} trained tokens (RL: {shape['prompts']} prompts x {shape['group_size']} completions; "
        f"DPO: {rows // 2} pairs), LoRA r={shared['lora_r']} alpha={shared['lora_alpha']} all-linear, fp32, "
        f"{shared['threads']} thread{'s' if shared['threads'] != 1 else ''}; median of {shape['iterations']} "
        f"iterations after {shape['warmup']} warm-up",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        config = shared | shape | {"model_dir": args.model_dir or str(Path(scratch) / f"{shape['size']}_qwen2")}
        results = measure(config)
    print(format_table(results))
    print(_versions())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
