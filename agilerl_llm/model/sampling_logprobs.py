"""Log-probs under the distribution a token was actually sampled from: temperature, then min-p, top-k and top-p.

A sampler does not draw from ``softmax(z / tau)``: it first removes the tokens that min-p, top-k and top-p rule
out and renormalises over the rest. vLLM reports exactly that distribution's log-probs ("processed" log-probs), so
the rollout/trainer mismatch correction (``losses.vllm_importance_weights``) must compare it with the same
processing on the trainer's side, or every token of a top-k run would look mismatched. HuggingFace ``generate``
applies the same warpers in the same order.

Math, per row with tempered logits z = (W h + b) / tau::

    min-p:  drop v when softmax(z)_v < min_p * max_u softmax(z)_u
    top-k:  drop v when z_v < the k-th largest z            (ties with the k-th value are kept)
    top-p:  sort ascending, drop the prefix whose cumulative probability is <= 1 - top_p (never the largest)
    logp_v  = z_v - log sum_{kept u} exp(z_u)   for kept v, -inf for dropped v

No gradient: the correction weight is detached by definition, so this runs under ``no_grad`` in row chunks of
one (C, V) tile, like ``fused_logprobs``'s forward.
"""

from __future__ import annotations

import torch

from agilerl_llm.model.logprobs import auto_chunk_rows


def mask_sampling_logits(
    logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """Tempered logits with the tokens a sampler would never draw set to -inf (min-p, then top-k, then top-p).

    Args:
        logits: (N, V) logits already divided by the temperature; not modified.
        top_k: keep the k largest (None or 0: no limit).
        top_p: keep the smallest set of largest tokens whose probability reaches top_p (1.0: no limit).
        min_p: keep tokens at least min_p times as likely as the most likely one (0.0: no limit).

    Returns:
        (N, V) masked logits, same dtype.
    """
    masked = logits.clone()
    if min_p > 0.0:
        probs = masked.softmax(dim=-1)
        masked.masked_fill_(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    if top_k and top_k < masked.shape[-1]:
        kth_largest = masked.topk(top_k, dim=-1).values[:, -1:]
        masked.masked_fill_(masked < kth_largest, float("-inf"))
    if top_p < 1.0:
        ascending, order = masked.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[:, -1] = False  # the most likely token always stays
        masked.scatter_(-1, order, ascending.masked_fill(drop, float("-inf")))
    return masked


@torch.no_grad()
def processed_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Log-probs of ``target_ids`` under the sampling distribution (see the module docstring), in fp32 chunks.

    Args:
        hidden: (..., H) final hidden states.
        weight: (V, H) lm_head weight.
        target_ids: (...) int64 ids.
        temperature: > 0.
        top_k, top_p, min_p: the sampling filters, as in ``mask_sampling_logits``.
        bias: (V,) optional lm_head bias.
        chunk_rows: rows per logits tile; None -> ``auto_chunk_rows(V)``.

    Returns:
        (...) float32 (float64 for float64 inputs); -inf where the target is outside the kept set.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1)
    rows = chunk_rows or auto_chunk_rows(weight.shape[0])
    result = torch.empty(flat_targets.shape, dtype=compute_dtype, device=hidden.device)
    for start in range(0, flat_hidden.shape[0], rows):
        stop = start + rows
        logits = (flat_hidden[start:stop] @ weight.T).to(compute_dtype)
        if bias is not None:
            logits += bias.to(compute_dtype)
        logits /= temperature
        masked = mask_sampling_logits(logits, top_k=top_k, top_p=top_p, min_p=min_p)
        result[start:stop] = masked.log_softmax(dim=-1).gather(-1, flat_targets[start:stop, None]).squeeze(-1)
    return result.view(target_ids.shape)
