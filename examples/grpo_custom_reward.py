"""GRPO with your own data and reward function, through the Python API.

    python examples/grpo_custom_reward.py               # under a minute on a CPU
    python examples/grpo_custom_reward.py --steps 5     # a smoke run

The data is a list of {"question", "answer"} dicts (a ``datasets.Dataset`` works too); the reward
function sees the decoded completion, the sample's answer and the rendered prompt. Here the reward is a
style preference rather than a right answer: the share of vowels among the characters of the reply, so
an untrained model can find it by sampling and GRPO can reinforce it within a minute.
The model is a tiny one built in code and written with ``save_pretrained``; point ``--model-dir`` at
your own HuggingFace causal-LM folder to train that instead.
"""

from __future__ import annotations

import argparse
import string
import tempfile

from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm import GRPO, ReasoningGym, finetune_llm_reasoning, save_llm_checkpoint
from agilerl_llm.testing import save_tiny_model


def vowel_reward(completion: str, answer: str, prompt: str) -> float:
    """The share of vowels among the reply's characters (0.0 for an empty reply)."""
    return sum(char in "aeiou" for char in completion) / len(completion) if completion else 0.0


def make_data() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Two-letter words as prompts: those starting a-m for training, n-z held out."""
    words = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    train = [{"question": f"rhyme with {w}", "answer": ""} for w in words if w[0] <= "m"]
    test = [{"question": f"rhyme with {w}", "answer": ""} for w in words if w[0] > "m"][:32]
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model-dir", help="a save_pretrained folder; a tiny model is built when omitted")
    parser.add_argument("--output-dir", default=None, help="where the trained adapters go (a temp dir by default)")
    args = parser.parse_args()

    model_dir = args.model_dir or save_tiny_model(tempfile.mkdtemp(), "nano", initializer_range=0.2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, test = make_data()
    env = ReasoningGym(train, test, tokenizer, vowel_reward, data_batch_size_per_gpu=4, seed=0)
    agent = GRPO(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
        group_size=8,
        batch_size=32,
        lr=5e-3,
        beta=0.0,
        temperature=1.0,
        max_output_tokens=4,
        gradient_checkpointing=False,
        seed=0,
    )
    pop, history = finetune_llm_reasoning(
        [agent], env, max_steps=args.steps, evaluation_interval=max(1, args.steps // 2), progress=False
    )
    evaluations = [row["eval/reward"] for row in history if "eval/reward" in row]
    print(f"held-out reward: before {evaluations[0]:.3f}, after {evaluations[-1]:.3f}")
    output_dir = args.output_dir or tempfile.mkdtemp()
    save_llm_checkpoint(pop[0], output_dir)
    print(f"adapters saved to {output_dir} (load with PeftModel.from_pretrained(base, '{output_dir}/actor'))")


if __name__ == "__main__":
    main()
