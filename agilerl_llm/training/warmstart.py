"""Warm start: brief supervised training of a causal LM on demonstrations, before RL.

RL can only sharpen behaviour the policy already produces now and then: GRPO's advantage is zero in a
group whose completions all score the same, so a policy that never gets near the answer never learns.
A real pipeline starts RL from an instruction-tuned checkpoint; the quickstart's randomly initialised
tiny model gets a deliberately short version of that stage here.

The objective is next-token cross-entropy on the completion tokens only (the closing eos included);
the prompt tokens are context, masked out of the loss with the label -100. Every parameter is trained
(no LoRA): this produces the *base model* that the RL stage then loads with ``from_pretrained`` and
adapts with LoRA.

Notation: B examples per batch, T tokens (prompt + completion, right-padded), V vocabulary.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agilerl_llm.envs.multiturn import ChatTurns, as_messages, opening_messages

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DemonstrationBatch:
    """A right-padded batch of prompt + completion demonstrations.

    Attributes:
        input_ids: (B, T) prompt tokens then completion tokens, right-padded with the pad id.
        attention_mask: (B, T) 1 on real tokens, 0 on padding.
        labels: (B, T) the token itself on completion positions, ``IGNORE_INDEX`` on prompt and padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def tokenize_demonstrations(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """Token ids of each ``(prompt_text, completion_text)`` pair and the number of prompt tokens.

    Prompt and completion are tokenized separately, as RL sees them: the prompt as the environment
    renders it, the completion as generated tokens after it.
    """
    if not examples:
        raise ValueError("examples is empty; pass at least one (prompt_text, completion_text) pair.")
    tokenized = []
    for index, (prompt, completion) in enumerate(examples):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not completion_ids:
            raise ValueError(f"example {index} has an empty completion; every demonstration needs answer tokens.")
        tokenized.append((prompt_ids + completion_ids, len(prompt_ids)))
    return tokenized


def collate_demonstrations(tokenized: Sequence[tuple[list[int], int]], pad_token_id: int) -> DemonstrationBatch:
    """Right-pad tokenized demonstrations into one batch with prompt and padding masked out of the labels."""
    width = max(len(ids) for ids, _ in tokenized)
    input_ids = torch.full((len(tokenized), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(tokenized), width), dtype=torch.long)
    labels = torch.full((len(tokenized), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(tokenized):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return DemonstrationBatch(input_ids, attention_mask, labels)


def demonstration_loss(model: PreTrainedModel, batch: DemonstrationBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens of ``batch`` (a scalar).

    Position t of the (B, T, V) logits predicts token t + 1, so the logits are shifted against the labels;
    positions whose target is a prompt or padding token carry ``IGNORE_INDEX`` and contribute nothing.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def pretrain_on_demonstrations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    max_grad_norm: float = 1.0,
) -> PreTrainedModel:
    """Train every parameter of ``model`` to produce each completion after its prompt; returns the model.

    Each step draws ``batch_size`` examples at random (with a generator seeded by ``seed``, so the run is
    reproducible) and takes one AdamW step on ``demonstration_loss``. The model is left in eval mode.

    Args:
        model: a HuggingFace causal LM, trained in place.
        tokenizer: its tokenizer; its pad token pads the batches.
        examples: ``(prompt_text, completion_text)`` pairs. The prompt is rendered exactly as the RL
            environment renders it (chat template and generation prompt applied); the completion ends with
            the eos token so the model learns to stop.
        steps: optimizer steps. Keep this short before RL: the aim is the answer format and some skill.
        batch_size: examples per step.
        lr: AdamW learning rate (constant, no weight decay).
        seed: seeds the order in which examples are drawn.
        max_grad_norm: gradient-norm clip.
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"steps, batch_size and lr must be positive; got steps={steps}, batch_size={batch_size}, lr={lr}."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before the warm start.")
    tokenized = tokenize_demonstrations(tokenizer, examples)
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        indices = torch.randint(len(tokenized), (batch_size,), generator=generator).tolist()
        batch = collate_demonstrations([tokenized[i] for i in indices], tokenizer.pad_token_id)
        loss = demonstration_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def episode_demonstrations(
    tokenizer: PreTrainedTokenizerBase,
    env_factory: Callable[[], Any],
    policy: Callable[[list[dict[str, str]], random.Random], str],
    seeds: Sequence[int],
    *,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """``(conversation so far, next action + eos)`` pairs from multi-turn episodes a scripted ``policy`` plays.

    Each prompt is the episode's chat rendered with the generation prompt, exactly as the RL collection renders
    the first prompt (``ChatTurns``), so the warm start and the RL stage see one format.

    Args:
        tokenizer: the tokenizer with the chat template the episodes are rendered through.
        env_factory: builds a fresh ``MultiTurnEnv``.
        policy: ``policy(messages, rng) -> action text`` given the chat so far (system message, if the env has a
            ``system_prompt``, then alternating user / assistant messages).
        seeds: one episode per seed; keep them apart from the training and held-out seeds.
        seed: seeds the ``random.Random`` handed to the policy.
    """
    rng, turns, pairs = random.Random(seed), ChatTurns(tokenizer), []
    for episode_seed in seeds:
        env = env_factory()
        where = f"demonstration episode (seed {episode_seed})"
        try:
            observation, _ = env.reset(seed=episode_seed)
            messages = opening_messages(env, observation, f"{where}: env.reset")
            for _ in range(env.max_turns):
                action = policy(messages, rng)
                pairs.append((turns.render(messages, add_generation_prompt=True), action + tokenizer.eos_token))
                observation, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    break
                messages += [{"role": "assistant", "content": action}]
                messages += as_messages(observation, f"{where}: env.step")
        finally:
            env.close()
    return pairs


def save_base_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write a (warm-started) model and its tokenizer with ``save_pretrained`` into ``directory``, the folder an RL
    agent then loads with ``from_pretrained`` (``model_name=``); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
