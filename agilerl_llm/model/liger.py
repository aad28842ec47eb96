"""GRPO's policy loss through liger-kernel's fused linear GRPO loss (``use_liger_loss=True``).

Liger takes the final hidden states and the lm_head weight and computes the selected tokens' log-probs, the
clipped objective, the KL term and their gradients chunk by chunk, so the logits of a whole micro-batch never
exist at once. It reproduces ``losses.grpo_policy_loss`` exactly for:

* ``loss_type="grpo"`` at the token level (Liger's "dapo": the per-token clipped surrogate summed over action
  tokens and divided by the optimizer batch's token count, which is our aggregation);
* ``loss_type="gspo"`` at the trajectory level (Liger's "sequence" level: each row's mean log-ratio);
* with one advantage per row (trajectory advantages), the k3 KL penalty, and the vLLM importance weights.

PPO (per-token GAE advantages, which Liger's GRPO loss cannot take) goes through Liger's chunked PPO base with
``losses.grpo_policy_loss`` as the chunk loss (``liger_token_ppo_loss``).

Everything else stays on the standard path (``liger_unsupported_reason`` says why, once): CISPO (Liger clamps its
weight only from above, ours on both sides), turn-level ratios or advantages, and KL advantage shaping.

liger-kernel is imported only when the path is used; without it the error names the extra to install.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from agilerl_llm.losses import PolicyLossOutput, grpo_policy_loss

LIGER_EXTRA = "use_liger_loss=True needs liger-kernel: pip install 'agilerl_llm[liger]' (or pip install liger-kernel)."


def require_liger() -> Any:
    """liger-kernel's ``LigerFusedLinearGRPOLoss`` class.

    Raises:
        ImportError: naming the ``liger`` extra when liger-kernel is not installed.
    """
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as error:
        raise ImportError(LIGER_EXTRA) from error
    return LigerFusedLinearGRPOLoss


def liger_unsupported_reason(
    loss_type: str, importance_sampling_level: str, use_kl_advantage_shaping: bool
) -> str | None:
    """Why these settings cannot use the Liger loss (None: they can)."""
    if loss_type == "cispo":
        return "Liger's CISPO clamps the importance weight only from above, ours on both sides"
    if (loss_type, importance_sampling_level) not in {("grpo", "token"), ("gspo", "trajectory")}:
        return f'Liger has no "{importance_sampling_level}"-level importance ratio for loss_type={loss_type!r}'
    if use_kl_advantage_shaping:
        return "Liger adds the KL to the loss and cannot shape the advantages with it"
    return None


def row_advantages(advantages: Tensor, action_mask: Tensor) -> Tensor | None:
    """(N, T) token advantages -> (N,) when every action token of a row carries the same value, else None
    (turn-level advantages, which Liger's one-advantage-per-row interface cannot express)."""
    mask = action_mask.bool()
    first = advantages.gather(1, mask.to(torch.int64).argmax(dim=1, keepdim=True))  # (N, 1)
    if not bool(torch.where(mask, advantages == first, True).all()):
        return None
    return first[:, 0]


def liger_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_ids: Tensor,
    action_mask: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    token_weights: Tensor | None,
    *,
    loss_type: str,
    ratio_low: float,
    ratio_high: float,
    beta: float,
    temperature: float,
    num_tokens_normalizer: Tensor,
    world_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One micro-batch's GRPO / GSPO loss, KL and clip fraction through Liger.

    Args:
        hidden: (N, T, H) final hidden states at the positions that predict ``target_ids`` (carries the gradient).
        weight, bias: the lm_head's (V, H) weight and (V,) bias or None.
        target_ids: (N, T) the tokens scored.
        action_mask: (N, T) which of them are actions.
        advantages: (N,) one advantage per row (``row_advantages``).
        old_logprobs: (N, T) behaviour log-probs, or None (on-policy: the ratio is 1).
        ref_logprobs: (N, T) reference log-probs, or None (no KL term).
        token_weights: (N, T) detached vLLM importance weights, or None.
        loss_type, ratio_low, ratio_high, beta, temperature: as for ``grpo_policy_loss``.
        num_tokens_normalizer: action tokens in the whole optimizer batch, over every rank.
        world_size: processes in the run (Liger divides its token count by it).

    Returns:
        loss (0-d, differentiable), kl and clip_fraction (0-d, detached), each normalised like
        ``grpo_policy_loss``'s so that micro-batches sum to the optimizer step's value.
    """
    loss_class = require_liger()
    mask = action_mask.bool()
    use_kl = ref_logprobs is not None and beta > 0

    def masked(values: Tensor | None) -> Tensor | None:
        # Non-action positions hold whatever padding left there; zero them so no exp() can overflow.
        return None if values is None else torch.where(mask, values, 0.0).detach()

    loss_fn = loss_class(
        beta=beta if use_kl else 0.0,
        compiled=hidden.is_cuda,  # only the loss math is compiled; on the CPU that needs no C++ toolchain
        use_ref_model=use_kl,
        chunk_size=1,
        epsilon_low=1.0 - ratio_low,
        epsilon_high=ratio_high - 1.0,
        loss_type="dapo",
        importance_sampling_level="sequence" if loss_type == "gspo" else "token",
        temperature=temperature,
    )
    loss, metrics = loss_fn(
        hidden,
        weight,
        target_ids,
        mask.to(hidden.dtype),
        advantages.to(hidden.dtype),
        bias=bias,
        ref_per_token_logps=masked(ref_logprobs) if use_kl else None,
        old_per_token_logps=masked(old_logprobs),
        vllm_is_ratio=masked(token_weights),
        num_items_in_batch=num_tokens_normalizer * world_size,
    )
    # Liger's metrics average over this micro-batch's tokens (per row chunk, summed); ours over the step's.
    rescale = mask.sum().clamp(min=1).to(torch.float32) / num_tokens_normalizer
    kl = metrics[0].detach() * rescale if use_kl else torch.zeros((), device=hidden.device)
    clip_fraction = metrics[-1].detach() * rescale
    return loss, kl, clip_fraction


def liger_token_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_ids: Tensor,
    action_mask: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor,
    token_weights: Tensor | None,
    *,
    ratio_low: float,
    ratio_high: float,
    temperature: float,
    num_tokens_normalizer: Tensor,
) -> PolicyLossOutput:
    """PPO's clipped policy loss with one advantage per token (GAE), through Liger's fused linear PPO machinery.

    Liger's GRPO loss takes one advantage per row, so PPO uses Liger's chunked base
    (``LigerFusedLinearPPOBase``: the head, log-probs and their gradient row by row, no full logits) with our own
    loss on each chunk: ``losses.grpo_policy_loss`` at the token level, beta 0, which is what PPO's standard path
    computes from the fused log-prob op.

    Args:
        hidden: (N, T, H) final hidden states predicting ``target_ids`` (carries the gradient).
        weight, bias: the lm_head's (V, H) weight and (V,) bias or None.
        target_ids, action_mask, advantages, old_logprobs: (N, T).
        token_weights: (N, T) detached vLLM importance weights, or None.
        num_tokens_normalizer: action tokens in the whole optimizer batch, over every rank.

    Returns:
        ``PolicyLossOutput`` (kl 0: PPO puts its KL into the rewards), scalars normalised by the normaliser.
    """
    require_liger()
    mask = action_mask.bool()

    def masked(values: Tensor | None) -> Tensor | None:
        return None if values is None else torch.where(mask, values, 0.0).detach()

    loss, (policy_loss, clip_fraction, ratio_mean) = _token_ppo_function().apply(
        hidden, weight, target_ids, mask.to(hidden.dtype), masked(advantages), bias, masked(old_logprobs),
        masked(token_weights), ratio_low, ratio_high, temperature, num_tokens_normalizer,
    )  # fmt: skip
    zero = torch.zeros((), device=hidden.device)
    return PolicyLossOutput(loss, policy_loss.detach(), zero, clip_fraction.detach(), ratio_mean.detach())


@functools.cache
def _token_ppo_function() -> type[torch.autograd.Function]:
    """The autograd function, defined on first use (liger-kernel is an optional extra)."""
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    class TokenAdvantagePPOFunction(LigerFusedLinearPPOBase):
        @staticmethod
        def ppo_loss_fn(
            per_token_logps, attention_mask, advantages, old_per_token_logps, vllm_is_ratio, epsilon_low,
            epsilon_high, num_items_in_batch, **_: Any,
        ):  # fmt: skip
            output = grpo_policy_loss(
                per_token_logps,
                per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps,
                None,
                advantages,
                attention_mask.bool(),
                loss_type="grpo",
                ratio_low=1.0 - epsilon_low,
                ratio_high=1.0 + epsilon_high,
                beta=0.0,
                num_tokens_normalizer=num_items_in_batch,
                token_weights=vllm_is_ratio,
            )
            return output.loss, (output.policy_loss, output.clip_fraction, output.ratio_mean)

        @classmethod
        def forward(cls, ctx, hidden, weight, target_ids, mask, advantages, bias, old_logprobs, token_weights,
                    ratio_low, ratio_high, temperature, normaliser):  # fmt: skip
            return LigerFusedLinearPPOBase.forward(
                cls=cls, ctx=ctx, _input=hidden, weight=weight, selected_token_ids=target_ids, attention_mask=mask,
                advantages=advantages, bias=bias, old_per_token_logps=old_logprobs, vllm_is_ratio=token_weights,
                epsilon_low=1.0 - ratio_low, epsilon_high=ratio_high - 1.0, beta=0.0, temperature=temperature,
                compiled=False, use_ref_model=False, chunk_size=1, num_items_in_batch=normaliser,
            )  # fmt: skip

        @staticmethod
        def backward(ctx, grad_output, *grad_metrics):
            grad_input, grad_weight, _, _, _, grad_bias = LigerFusedLinearPPOBase.backward(ctx, grad_output)[:6]
            return grad_input, grad_weight, None, None, None, grad_bias, None, None, None, None, None, None

    return TokenAdvantagePPOFunction
