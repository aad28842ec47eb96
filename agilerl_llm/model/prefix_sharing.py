"""The decoder run once per distinct prompt: completions of a group read their prompt's keys and values.

GRPO samples G completions of each prompt, and every log-prob forward (old, reference, the training forward
with grad, PPO's critic) used to encode each prompt G times. Here the rows' shared prefix (the columns before
the first action token, identical within a group) is run once per distinct prefix with ``use_cache=True``; the
cache is gathered back to one entry per row (an index, so gradients from every completion flow into the one
prefix computation) and the completions run on top of it. The hidden states come back in the (B, S, H) layout
the plain forward gives, equal to it up to float rounding (``tests/test_prefix_sharing.py``).

It does not apply (the plain forward runs) when no two rows share their prefix, and under activation
checkpointing with grad: transformers drops the cache inside checkpointed layers. Whether a model's cache
supports it is checked once by running it (``prefix_sharing_unsupported_reason``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.generation import utils as generation_utils

try:  # the per-layer cache of transformers >= 4.56
    from transformers.cache_utils import DynamicLayer as dynamic_layer
except ImportError:  # pragma: no cover - older transformers: the cache selects its own rows
    dynamic_layer = None

from agilerl_llm.model.probe import eval_mode, probe_device, relative_difference

# transformers renamed ``past_key_values`` to ``cache``; pass whichever this version takes.
CACHE_ARGUMENT = (
    "cache"
    if "cache" in inspect.signature(generation_utils.GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


def output_cache(output) -> object | None:
    """The KV cache a forward returned: ``cache`` in newer transformers, ``past_key_values`` before the rename (read
    by name, so the renamed version's deprecation alias and its message are not triggered)."""
    for name in ("cache", "past_key_values"):
        if name in output:
            return output[name]
    return None


def shared_prefix_length(action_mask: torch.Tensor) -> int | None:
    """Columns before every row's first action token: (N, T) log-prob-aligned action mask (column j scores token
    j + 1) -> P, so tokens [0, P) are prompt in every row; None when no row has an action."""
    columns = action_mask.any(dim=0).nonzero()
    return int(columns[0]) + 1 if len(columns) else None


def window_prefix(prefix_length: int | None, first_column: int) -> int | None:
    """The prefix length inside a window of the batch that starts at ``first_column`` (None when nothing is left)."""
    if prefix_length is None or prefix_length <= first_column:
        return None
    return prefix_length - first_column


def shared_prefix_forward(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, prefix: int
) -> torch.Tensor | None:
    """(B, S) ids, mask and positions -> (B, S, H) final hidden states with each distinct ``[:, :prefix]`` run
    once; None when nothing is shared (no two rows with the same prefix, or no room for a suffix)."""
    if not 0 < prefix < input_ids.shape[1]:
        return None
    key = torch.cat([input_ids[:, :prefix], attention_mask[:, :prefix].to(input_ids.dtype)], dim=1)
    distinct, row_prefix = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == input_ids.shape[0]:
        return None
    prefix_mask = distinct[:, prefix:]
    prefix_positions = position_ids[:, :prefix][_first_row_of_each(row_prefix, distinct.shape[0])]
    head = backbone(
        input_ids=distinct[:, :prefix], attention_mask=prefix_mask, position_ids=prefix_positions, use_cache=True
    )
    cache = output_cache(head)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    _select_rows(cache, row_prefix)  # one entry per row again: an index, differentiable
    tail = backbone(
        input_ids=input_ids[:, prefix:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, prefix:],
        use_cache=True,
        **{CACHE_ARGUMENT: cache},
    )
    return torch.cat([head.last_hidden_state.index_select(0, row_prefix), tail.last_hidden_state], dim=1)


def _select_rows(cache, rows: torch.Tensor) -> None:
    """``cache.batch_select_indices(rows)``, with ``index_select`` for plain dynamic layers: its backward is an
    ``index_add``, about 4x faster on the CPU than the accumulating put behind the advanced index transformers
    uses. Any other layer type selects its own rows (it may hold more than keys and values)."""
    layers = getattr(cache, "layers", None)
    if dynamic_layer is None or layers is None:
        cache.batch_select_indices(rows)
        return
    for layer in layers:
        if type(layer) is not dynamic_layer:
            layer.batch_select_indices(rows)
        elif layer.get_seq_length() > 0:
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)


def _first_row_of_each(row_group: torch.Tensor, groups: int) -> torch.Tensor:
    """(B,) group index of each row -> (groups,) the first row of each group."""
    rows = torch.arange(row_group.shape[0], device=row_group.device)
    return torch.full((groups,), row_group.shape[0], device=row_group.device).scatter_reduce(
        0, row_group, rows, reduce="amin"
    )


@torch.no_grad()
def prefix_sharing_unsupported_reason(backbone: nn.Module) -> str | None:
    """None when ``backbone`` gives a shared-prefix batch the hidden states of the plain forward; otherwise why
    not. Runs two 5-token rows sharing a 3-token prefix, both ways (negligible next to training)."""
    device = probe_device(backbone)
    if device is None:
        return None
    vocab = int(backbone.get_input_embeddings().num_embeddings)
    ids = (torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]], device=device)) % vocab
    mask = torch.ones_like(ids)
    positions = torch.arange(5, device=device).expand(2, 5)
    try:
        with eval_mode(backbone):
            plain = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            shared = shared_prefix_forward(backbone, ids, mask, positions, 3)
    except (TypeError, ValueError, RuntimeError, AttributeError) as error:
        return f"its forward does not take a prefix cache ({type(error).__name__}: {error})"
    if shared is None:
        return "its forward returns no cache that can be gathered by row"
    error = relative_difference(shared, plain.last_hidden_state, backbone)
    if error is not None:
        return f"the shared-prefix hidden states differ from the plain forward's (relative {error:.2g})"
    return None
