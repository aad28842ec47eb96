"""Builders several test modules share: a tiny GRPO agent and an arithmetic ``ReasoningGym``.

Imported as ``from helpers import ...`` (pytest puts this folder on ``sys.path`` for the test modules in it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from agilerl_llm import GRPO
from agilerl_llm.envs.reasoning import ReasoningGym

# 15 "a+b=" questions; tests train on the first 10 and hold out the last 5.
ARITHMETIC = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 50, 10) for b in range(3)]


def tiny_grpo(model_dir: str | Path, tokenizer: Any, by_name: bool = False, **overrides: Any) -> GRPO:
    """A GRPO agent on a fresh ``from_pretrained`` load of ``model_dir``: 2 completions per prompt, 3 new tokens.

    ``by_name`` builds it from ``model_name`` (so checkpoints record where the base came from) instead of passing
    the loaded network."""
    settings = {
        "group_size": 2,
        "batch_size": 2,
        "max_output_tokens": 3,
        "lr": 1e-2,
        "seed": 1,
        "gradient_checkpointing": False,
    } | overrides
    if by_name:
        return GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(model_dir), **settings)
    network = AutoModelForCausalLM.from_pretrained(model_dir)
    return GRPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=network, **settings)


def hashed_reward(completion: str, answer: str, prompt: str) -> float:
    """A reward that varies with the completion, so a few steps of training really move the adapters."""
    return sum(map(ord, completion)) % 7 / 7


def arithmetic_env(
    tokenizer: Any, reward_fn: Callable[[str, str, str], float] = hashed_reward, batch_size: int = 2
) -> ReasoningGym:
    return ReasoningGym(
        ARITHMETIC[:10], ARITHMETIC[10:], tokenizer, reward_fn, data_batch_size_per_gpu=batch_size, seed=5
    )


def move_lora_b(agent: Any, std: float = 0.05, adapter: str | None = None, seed: int = 1) -> None:
    """Draw the LoRA B matrices (``adapter``'s, or every adapter's) off their zero init, so each adapter changes
    the model's output and every LoRA weight gets a gradient."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in agent.actor.named_parameters():
            if "lora_B" in name and (adapter is None or f".{adapter}." in name):
                parameter.normal_(0, std)
