"""The batch a learner works on: completions, masks, rewards and what is derived from them.

Notation: N rows, S tokens per row, T = S - 1 log-prob positions, K turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from agilerl_llm.rollout.base import ActionResult


@dataclass(frozen=True)
class Experience:
    """Rows of [prompt | completion] with their masks and per-row data.

    Attributes:
        completion_ids: (N, S) token ids.
        attention_mask: (N, S) bool.
        action_mask: (N, T) bool, True where the next token was generated.
        rewards: (N,) per row, or (N, K) per turn.
        advantages, old_logprobs, ref_logprobs: (N, T) once computed.
        turn_ids: (N, T) int64 turn index per action token (-1 elsewhere), when given.
        token_weights: (N, T) rollout/trainer mismatch weights (vLLM), when the engine reported sampling log-probs.
    """

    completion_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    turn_ids: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    def with_fields(self, **values: Any) -> Experience:
        """A copy with some fields replaced."""
        return replace(self, **values)

    def select(self, rows: torch.Tensor) -> Experience:
        """The rows picked by a bool mask or an index tensor, every row-aligned field alike."""
        picked = {}
        for field in fields(self):
            value = getattr(self, field.name)
            picked[field.name] = value[rows.to(value.device)] if isinstance(value, torch.Tensor) else value
        return Experience(**picked)

    @classmethod
    def from_input(cls, experiences: Any, pad_token_id: int, device: torch.device) -> Experience:
        """Accept ``(completion_ids, action_masks, rewards[, attention_mask])``, a dict, or an ``Experience``.

        ``rewards`` may be (B, G) as the env returns them; it is flattened to one reward per row.
        Without an attention mask, one is derived from the generation structure: real tokens run from the
        first non-pad prompt token (prompts are left-padded) to the last action token. The pad id is only
        used for that leading run, never to find where a completion ends.
        """
        if isinstance(experiences, Experience):
            batch = experiences
        else:
            if isinstance(experiences, dict):
                ids, action_mask = experiences["completion_ids"], experiences["action_masks"]
                rewards, attention_mask = experiences["rewards"], experiences.get("attention_mask")
            else:
                ids, action_mask, rewards, *rest = experiences
                attention_mask = rest[0] if rest else None
            if isinstance(ids, ActionResult):
                ids, action_mask, attention_mask = ids.completion_ids, ids.action_masks, ids.attention_mask
            if isinstance(ids, (list, tuple)):
                raise ValueError("completion_ids must be one stacked (N, S) tensor, as get_action returns it.")
            rewards = torch.as_tensor(rewards)
            # float32 at least; float64 rewards stay float64 (the advantages follow their dtype)
            rewards = rewards.to(
                torch.promote_types(rewards.dtype, torch.float32) if rewards.is_floating_point() else torch.float32
            )
            rows = ids.shape[0]
            rewards = rewards.reshape(rows) if rewards.numel() == rows else rewards.reshape(rows, -1)
            if attention_mask is None:
                attention_mask = _derive_attention_mask(ids, action_mask.bool(), pad_token_id)
            batch = cls(ids, attention_mask.bool(), action_mask.bool(), rewards)
        _check_shapes(batch)
        return batch.to(device)

    def to(self, device: torch.device) -> Experience:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def place_on_action_tokens(
    per_row: list[torch.Tensor | None], action_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values of the generated tokens (1-D, in generation order) laid onto the (N, T) action positions.

    Args:
        per_row: N entries, each a 1-D tensor with one value per action token of its row, or None.
        action_mask: (N, T) bool.

    Returns:
        (N, T) float values (0 off the action tokens and on rows given None) and (N,) bool: the rows given values.
    """
    rows = action_mask.shape[0]
    if len(per_row) != rows:
        raise ValueError(f"sampling_logps has {len(per_row)} rows but the batch has {rows}; pass one entry per row.")
    placed = torch.zeros(action_mask.shape, dtype=torch.float32, device=action_mask.device)
    given = torch.zeros(rows, dtype=torch.bool, device=action_mask.device)
    for row, values in enumerate(per_row):
        if values is None:
            continue
        positions = action_mask[row].nonzero().squeeze(-1)
        if values.numel() != positions.numel():
            raise ValueError(
                f"sampling_logps[{row}] has {values.numel()} values but row {row} has {positions.numel()} action "
                "tokens; pass the sampling log-probs of exactly the generated tokens."
            )
        placed[row, positions] = values.to(placed.device, torch.float32)
        given[row] = True
    return placed, given


def micro_batches(batch: Experience, size: int) -> Iterator[Experience]:
    """Consecutive slices of ``size`` rows."""
    for start in range(0, batch.num_rows, size):
        yield batch.select(torch.arange(start, min(start + size, batch.num_rows)))


def _derive_attention_mask(ids: torch.Tensor, action_mask: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device)
    not_pad = ids != pad_token_id
    prompt_start = torch.where(not_pad.any(1), not_pad.int().argmax(1), torch.zeros_like(ids[:, 0]))
    has_action = action_mask.any(1)
    last_action = action_mask.shape[1] - 1 - action_mask.flip(1).int().argmax(1)
    end = torch.where(has_action, last_action + 2, torch.full_like(last_action, ids.shape[1]))
    return (positions[None] >= prompt_start[:, None]) & (positions[None] < end[:, None])


def _check_shapes(batch: Experience) -> None:
    rows, width = batch.completion_ids.shape
    if batch.attention_mask.shape != (rows, width):
        raise ValueError(f"attention_mask has shape {tuple(batch.attention_mask.shape)}, expected {(rows, width)}.")
    if batch.action_mask.shape != (rows, width - 1):
        raise ValueError(
            f"action_masks has shape {tuple(batch.action_mask.shape)}, expected {(rows, width - 1)} "
            "(one entry per next-token position)."
        )
    if batch.rewards.shape[0] != rows:
        raise ValueError(f"rewards has {batch.rewards.shape[0]} rows but completion_ids has {rows}.")
