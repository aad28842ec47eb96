"""The quickstart: train a tiny model with GRPO on a built-in task, on the CPU, in a few minutes.

    python -m agilerl_llm.quickstart                       # the default run (configs/quickstart.yaml)
    python -m agilerl_llm.quickstart training.max_steps=20 # any field as a dotted override

What happens: a ~0.8M-parameter Qwen2-style model and a byte-level tokenizer are built in code; a short
supervised warm start teaches the answer format (and a little skill) and the result is written with
``save_pretrained``; GRPO then loads it with ``from_pretrained``, adds LoRA adapters (actor and
reference) and trains on "reverse the letters" prompts, scored by a partial-credit reward. The held-out
prompts are never trained on; the reward on them is printed before and after RL.
"""

from __future__ import annotations

import argparse
import sys

from agilerl_llm.training.config import RunConfig
from agilerl_llm.training.job import JobResult, run_job


def summary_table(result: JobResult) -> str:
    """The before/after table printed at the end of a run."""
    rows = [
        ("held-out reward (mean)", result.reward_before, result.reward_after),
        (result.exact_label, result.exact_before, result.exact_after),
    ]
    lines = [f"{'metric':<26}{'before RL':>12}{'after RL':>12}", "-" * 50]
    lines += [f"{name:<26}{before:>12.3f}{after:>12.3f}" for name, before, after in rows]
    # a ratio to a zero reward says nothing ("infx"): then the difference is reported
    gain = (
        f"reward gain {result.reward_after / result.reward_before:.2f}x"
        if result.reward_before > 0
        else f"reward change {result.reward_after - result.reward_before:+.3f} (from 0)"
    )
    lines += ["-" * 50, f"{gain} in {result.seconds:.0f} s; base model in {result.base_model_dir}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agilerl_llm.quickstart", description="Train a tiny model with GRPO on the CPU."
    )
    parser.add_argument("--config", help="a YAML run config; the built-in defaults when omitted")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.max_steps=20")
    args = parser.parse_args(argv)
    config = (
        RunConfig.from_yaml(args.config, args.overrides)
        if args.config
        else RunConfig.from_dict({}, args.overrides, source="quickstart")
    )
    result = run_job(config)
    print(summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
