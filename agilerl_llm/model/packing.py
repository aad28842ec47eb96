"""Padding-free sequence packing of the training forward.

A padded batch spends the decoder's compute on padding: a group of completions of very different lengths is
padded to the longest. Packing lays the real tokens of several rows end to end in one row ("bin"), each row's
positions starting again at 0, and runs the decoder with no attention mask. transformers (>= 4.56) reads the
restarting positions as packed sequences and keeps every sequence's attention inside itself: a block-diagonal
causal mask for eager / SDPA, a BlockMask for FlexAttention, cumulative sequence lengths for FlashAttention-2.

Bins are never wider than the longest row, so attention never costs more than it did padded, and there are never
more bins than rows. The decoder's hidden states are scattered back to the padded (B, S, H) layout, zero on
padding, so everything downstream (the fused log-prob op, Liger's loss, PPO's value head) is unchanged.

Whether a model honours packed positions is checked once, by running it (``packing_unsupported_reason``): a model
that builds its own mask, or an attention backend transformers cannot pack for, gives a different answer and
packing is then left off with a message that says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agilerl_llm.model.probe import eval_mode, probe_device, relative_difference

# Attention backends transformers' mask utilities know how to keep packed sequences apart in.
PACKING_ATTENTION_BACKENDS = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"})


@dataclass(frozen=True)
class PackedLayout:
    """Where each real token of a padded batch sits in the packed bins.

    ``rows`` / ``columns``: (N,) the token's place in the padded (B, S) batch; ``bins`` / ``slots``: (N,) its place
    in the packed (num_bins, width) batch; ``positions``: (num_bins, width) position ids (each row's tokens count
    from 0; a bin's unused tail is one more short sequence of filler, also counting from 0).
    """

    rows: torch.Tensor
    columns: torch.Tensor
    bins: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    num_bins: int
    width: int


def plan_packing(attention_mask: torch.Tensor) -> PackedLayout:
    """First-fit-decreasing packing of the rows' attended tokens into bins as wide as the longest row.

    (B, S) mask -> layout. A row's tokens keep their order and stay in one bin (a row is never split); rows that
    attend to nothing are left out. Positions are the row's running count of attended tokens, which is what
    ``position_ids_from_mask`` gives the padded forward (and ``generate`` gave the rollout).
    """
    lengths = attention_mask.sum(dim=1).tolist()
    width = max(max(lengths, default=0), 1)
    free: list[int] = []  # space left in each open bin
    placement: dict[int, tuple[int, int]] = {}  # row -> (bin, first slot)
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        length = lengths[row]
        if length == 0:
            continue
        bin_index = next((b for b, space in enumerate(free) if space >= length), len(free))
        if bin_index == len(free):
            free.append(width)
        placement[row] = (bin_index, width - free[bin_index])
        free[bin_index] -= length
    num_bins = max(len(free), 1)
    device = attention_mask.device
    rows, columns = attention_mask.nonzero(as_tuple=True)
    # rank of each attended token within its row (nonzero lists them row by row, left to right)
    rank = attention_mask.long().cumsum(dim=1)[rows, columns] - 1
    start = torch.tensor([placement.get(r, (0, 0))[1] for r in range(len(lengths))], device=device, dtype=torch.long)
    bin_of_row = torch.tensor([placement.get(r, (0, 0))[0] for r in range(len(lengths))], device=device)
    bins = bin_of_row[rows].long()
    slots = start[rows] + rank
    positions = torch.zeros(num_bins, width, dtype=torch.long, device=device)
    positions[bins, slots] = rank
    for bin_index, space in enumerate(free):
        if space:  # the filler tail: its own sequence, so no real token attends to it
            positions[bin_index, width - space :] = torch.arange(space, device=device)
    return PackedLayout(rows, columns, bins, slots, positions, num_bins, width)


def pack_tokens(input_ids: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """(B, S) ids -> (num_bins, width) packed ids (filler is token 0; its outputs are never read)."""
    packed = input_ids.new_zeros(layout.num_bins, layout.width)
    packed[layout.bins, layout.slots] = input_ids[layout.rows, layout.columns]
    return packed


def unpack_hidden(packed_hidden: torch.Tensor, layout: PackedLayout, batch_shape: torch.Size) -> torch.Tensor:
    """(num_bins, width, H) -> (B, S, H) in the padded layout, zero where the batch is padding (differentiable)."""
    hidden = packed_hidden.new_zeros(*batch_shape, packed_hidden.shape[-1])
    hidden[layout.rows, layout.columns] = packed_hidden[layout.bins, layout.slots]
    return hidden


def packed_forward(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder over the packed batch: (B, S) ids and mask -> (B, S, H) final hidden states."""
    layout = plan_packing(attention_mask)
    outputs = backbone(
        input_ids=pack_tokens(input_ids, layout), attention_mask=None, position_ids=layout.positions, use_cache=False
    )
    return unpack_hidden(outputs.last_hidden_state, layout, input_ids.shape)


@torch.no_grad()
def packing_unsupported_reason(backbone: nn.Module) -> str | None:
    """None when ``backbone`` gives packed sequences the hidden states it gives them one at a time; otherwise why not.

    Runs the decoder on three short sequences, packed and one at a time (eight tokens: negligible next to training).
    """
    config = getattr(backbone, "config", None)
    backend = getattr(config, "_attn_implementation", None)
    if backend not in PACKING_ATTENTION_BACKENDS:
        return (
            f"attention backend {backend!r} is not one transformers packs sequences for "
            f"(it does for {sorted(PACKING_ATTENTION_BACKENDS)})"
        )
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return "this transformers version does not detect packed sequences (it needs >= 4.56)"
    device = probe_device(backbone)
    if device is None:
        return None
    vocab = int(backbone.get_input_embeddings().num_embeddings)
    # three sequences; the two short ones share a bin, the second one starting right after the first
    sequences = [torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6]]), torch.tensor([[7, 8]])]
    sequences = [(ids % vocab).to(device) for ids in sequences]
    padded_ids = torch.zeros(3, 4, dtype=torch.long, device=device)
    mask = torch.zeros_like(padded_ids)
    for row, ids in enumerate(sequences):
        padded_ids[row, : ids.shape[1]], mask[row, : ids.shape[1]] = ids[0], 1
    with eval_mode(backbone):
        alone = [
            backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state[0]
            for ids in sequences
        ]
        packed = packed_forward(backbone, padded_ids, mask)
    error = relative_difference(packed[mask.bool()], torch.cat(alone), backbone)
    if error is not None:
        return (
            f"{type(backbone).__name__} does not keep packed sequences apart (relative difference {error:.2g} from "
            "running them separately): it builds its own attention mask or positions"
        )
    return None
