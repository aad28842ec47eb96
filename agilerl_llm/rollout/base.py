"""What a rollout engine returns, and the sampling settings it takes.

Notation: N rows (prompts x completions per prompt), S = P + C tokens per row, where P is the
(left-padded) prompt length shared by the batch and C the longest completion (right-padded).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field


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
