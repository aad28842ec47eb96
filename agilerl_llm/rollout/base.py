"""The rollout seam: the ``RolloutEngine`` protocol, what an engine returns, and the sampling settings it takes.

An algorithm that generates holds one engine (``agent.rollout_engine``): HuggingFace ``generate``
(``rollout/hf.py``) by default. ``get_action`` and ``test`` only ever call ``engine.generate``; ``learn`` takes
the ``ActionResult`` (or an ``Experience``) and does not care which engine made it. An engine that keeps its
own copy of the weights compares the agent's ``weights_version`` (bumped by every optimizer step and every
checkpoint load) with the version it last synced, and syncs before generating when they differ.

Notation: N rows (prompts x completions per prompt), S = P + C tokens per row, where P is the
(left-padded) prompt length shared by the batch and C the longest completion (right-padded).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm


class SamplingSettings(BaseModel):
    """How completions are sampled during training rollouts (evaluation decodes greedily)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.9, gt=0.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int | None = Field(default=50, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    max_output_tokens: int | None = Field(default=None, ge=1)
    min_output_tokens: int = Field(default=0, ge=0)
    max_model_len: int = Field(default=1024, ge=2)


@dataclass(frozen=True)
class ActionResult:
    """Completions for a batch of prompts, with the masks the learner needs.

    Attributes:
        completion_ids: (N, S) prompt + completion tokens; rows of one prompt's group are contiguous.
        action_masks: (N, S-1) bool; position t is True when token t+1 was generated (aligned with log-probs).
        attention_mask: (N, S) bool; real tokens (not left padding of the prompt, not padding after the end).
        prompt_length: P, the padded prompt width.
        completion_lengths: (N,) generated tokens per row, the closing eos included.
        sampling_logprobs: per-row sampling log-probs when the engine reports them (vLLM), else None.

    Unpacks as ``completion_ids, action_masks = result`` like the classic two-value API.
    """

    completion_ids: torch.Tensor
    action_masks: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    completion_lengths: torch.Tensor
    sampling_logprobs: list[torch.Tensor] | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.completion_ids
        yield self.action_masks

    def completion_tokens(self, row: int) -> torch.Tensor:
        """The generated tokens of one row, the closing eos included."""
        start = self.prompt_length
        return self.completion_ids[row, start : start + int(self.completion_lengths[row])]


def masks_from_lengths(
    prompt_mask: torch.Tensor, completion_lengths: torch.Tensor, completion_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and action masks of [prompt | completion] rows from the generation structure alone.

    Args:
        prompt_mask: (N, P) real prompt tokens (left padding is False).
        completion_lengths: (N,) generated tokens kept per row.
        completion_width: C, the padded completion width.

    Returns:
        attention_mask (N, P + C) bool and action_masks (N, P + C - 1) bool.
    """
    positions = torch.arange(completion_width, device=completion_lengths.device)
    completion_mask = positions[None, :] < completion_lengths[:, None]
    attention_mask = torch.cat([prompt_mask.bool(), completion_mask], dim=1)
    action_masks = torch.zeros_like(attention_mask[:, 1:])
    # Log-prob position t scores token t + 1, so the completion's tokens sit at P - 1 ... P + C - 2.
    action_masks[:, prompt_mask.shape[1] - 1 :] = completion_mask
    return attention_mask, action_masks


class RolloutEngine(Protocol):
    """Generates completions for an agent's actor adapter."""

    def generate(
        self,
        agent: LLMAlgorithm,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        num_completions: int,
        sampling: SamplingSettings,
        do_sample: bool,
    ) -> ActionResult:
        """``num_completions`` completions per prompt (rows of a group contiguous): sampled with ``sampling`` when
        ``do_sample`` (training), greedy otherwise (evaluation). (B, P) left-padded prompts -> N = B x G rows."""
        ...

    def sync(self, agent: LLMAlgorithm) -> None:
        """Bring the engine's copy of the actor up to date (a no-op for an engine that reads the live model)."""
        ...

    def sleep(self) -> None:
        """Release what the engine holds while the trainer learns (a no-op where there is nothing to release)."""
        ...

    def wake(self) -> None:
        """Undo ``sleep`` before the next rollout."""
        ...

    def attach(self, agent: LLMAlgorithm) -> None:
        """Called once the agent is built: check it can be served (raise naming the setting) and register it."""
        ...

    def for_clone(self, clone: LLMAlgorithm) -> RolloutEngine:
        """The engine a clone of the agent uses (a fresh one, or this one shared)."""
        ...
