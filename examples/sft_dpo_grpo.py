"""The SFT -> DPO -> GRPO chain on a tiny model, on the CPU, in a few minutes.

    python examples/sft_dpo_grpo.py                 # the default run
    python examples/sft_dpo_grpo.py --quick         # a smoke run (seconds)

Each stage trains LoRA adapters over the same frozen base model and hands its checkpoint to the next:

1. SFT teaches "reverse the letters" from demonstrations (loss on the answer tokens only);
2. DPO loads the SFT checkpoint (its reference becomes the SFT actor) and learns to prefer the reversed
   answer over the letters left as they are;
3. GRPO loads the DPO checkpoint (the DPO actor becomes its KL anchor) and reinforces right letters.

One held-out metric is printed per stage: SFT's loss per answer token, DPO's preference accuracy and GRPO's
partial-credit letters reward (before and after RL).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm.algorithms.dpo import DPO
from agilerl_llm.algorithms.grpo import GRPO
from agilerl_llm.algorithms.sft import SFT
from agilerl_llm.envs.preference import PreferenceGym
from agilerl_llm.envs.reasoning import ReasoningGym
from agilerl_llm.envs.sft import SFTGym
from agilerl_llm.envs.tasks import get_task, letters_reward
from agilerl_llm.testing import save_tiny_model
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.preference import finetune_llm_preference
from agilerl_llm.training.reasoning import finetune_llm_reasoning
from agilerl_llm.training.sft import finetune_llm_sft


def run_chain(workdir: Path, sft_steps: int, dpo_steps: int, grpo_steps: int, seed: int = 0) -> dict[str, float]:
    """Run the three stages in ``workdir``, printing each stage's held-out metric; returns them all."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    base = save_tiny_model(workdir / "base", "tiny", initializer_range=0.2, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    task = get_task("reverse")
    train, test = task.make_dataset(512, 32, seed)
    quiet = MetricsLogger(print_every=0)

    def model() -> dict:
        """Every stage starts from the same frozen base model, loaded with from_pretrained."""
        network = AutoModelForCausalLM.from_pretrained(base)
        return {"actor_network": network, "gradient_checkpointing": False, "max_grad_norm": 1.0, "seed": seed}

    # Stage 1: supervised fine-tuning on (prompt, completion) pairs.
    sft_data = [{"prompt": s["question"], "completion": s["answer"]} for s in train]
    sft_test = [{"prompt": s["question"], "completion": s["answer"]} for s in test]
    sft_env = SFTGym(sft_data, sft_test, tokenizer, data_batch_size_per_gpu=32, seed=seed)
    sft = SFT(tokenizer.pad_token_id, tokenizer.pad_token, lr=1e-2, batch_size=32, **model())
    _, history = finetune_llm_sft([sft], sft_env, max_steps=sft_steps, evaluation_interval=sft_steps, logger=quiet,
                                  progress=False)  # fmt: skip
    results = {"sft/eval_loss_before": history[0]["eval/loss"], "sft/eval_loss": history[-1]["eval/loss"]}
    print(
        f"SFT   held-out loss per answer token: {results['sft/eval_loss_before']:.3f} -> {results['sft/eval_loss']:.3f} ({time.perf_counter() - started:.0f} s)"
    )
    sft.save_checkpoint(workdir / "sft", save_optimizer=False)

    # Stage 2: DPO from the SFT checkpoint; the SFT actor becomes actor and reference.
    def pairs(samples: list[dict]) -> list[dict]:
        return [{"prompt": s["question"], "chosen": s["answer"], "rejected": s["answer"][::-1]} for s in samples]

    dpo_env = PreferenceGym(pairs(train), pairs(test), tokenizer, data_batch_size_per_gpu=32, seed=seed)
    dpo = DPO(tokenizer.pad_token_id, tokenizer.pad_token, beta=0.1, lr=1e-2, batch_size=32, **model())
    dpo.load_checkpoint(workdir / "sft", load_optimizer=False)
    _, history = finetune_llm_preference([dpo], dpo_env, max_steps=dpo_steps, evaluation_interval=dpo_steps,
                                         logger=quiet, progress=False)  # fmt: skip
    results |= {
        "dpo/eval_accuracy_before": history[0]["eval/accuracy"],
        "dpo/eval_accuracy": history[-1]["eval/accuracy"],
    }
    print(
        f"DPO   held-out preference accuracy:   {results['dpo/eval_accuracy_before']:.3f} -> {results['dpo/eval_accuracy']:.3f} ({time.perf_counter() - started:.0f} s)"
    )
    dpo.save_checkpoint(workdir / "dpo", save_optimizer=False)

    # Stage 3: GRPO from the DPO checkpoint, partial-credit reward on held-out prompts.
    grpo_env = ReasoningGym(train, test, tokenizer, letters_reward, data_batch_size_per_gpu=8, seed=seed)
    grpo = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, group_size=8, batch_size=64, lr=2e-3, beta=0.01,
                max_output_tokens=8, temperature=1.0, **model())  # fmt: skip
    grpo.load_checkpoint(workdir / "dpo", load_optimizer=False)
    _, history = finetune_llm_reasoning([grpo], grpo_env, max_steps=grpo_steps, evaluation_interval=grpo_steps,
                                        logger=quiet, progress=False)  # fmt: skip
    results |= {"grpo/eval_reward_before": history[0]["eval/reward"], "grpo/eval_reward": history[-1]["eval/reward"]}
    print(
        f"GRPO  held-out letters reward:        {results['grpo/eval_reward_before']:.3f} -> {results['grpo/eval_reward']:.3f} ({time.perf_counter() - started:.0f} s)"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SFT -> DPO -> GRPO on a tiny model (CPU).")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = (3, 3, 2) if args.quick else (800, 60, 30)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead (and thrash on a shared CPU)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        run_chain(Path(workdir), *steps, seed=args.seed)
        print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
