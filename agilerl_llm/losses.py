"""Policy, KL, preference and value losses for LLM fine-tuning (pure tensor functions).

The GRPO family (``grpo_policy_loss``) optimises, per action token t of row i,

    loss_it = w_it * objective(r_it, A_it) + beta * k3_it

with ``r_it = exp(logprobs - old_logprobs)`` pooled according to ``importance_sampling_level`` and
``objective`` chosen by ``loss_type`` from ``POLICY_OBJECTIVES``:

    * "grpo"  (DeepSeekMath 2024): PPO's clipped surrogate ``-min(r A, clip(r, ratio_low, ratio_high) A)``
      on the per-token ratio.
    * "gspo"  (Zheng et al. 2025): the same surrogate on the sequence ratio
      ``s_i = exp(mean_t log r_it)``, shared by every token of the row; gradients reach every token.
    * "cispo" (MiniMax-M1 2025): ``-sg(clip(r, ratio_low, ratio_high)) A log pi``; the clipped weight is
      detached, so clipped tokens still pass gradient through ``log pi``. The paper bounds only the
      upper side in practice; pass a small ``ratio_low`` to reproduce that.

Conventions
    * Clipping takes *ratio bounds* ``(ratio_low, ratio_high)``, e.g. (0.8, 1.2), never epsilons.
      ``resolve_clip_bounds`` turns the spec's ``clip_coef`` (scalar eps or ratio tuple) into bounds.
    * One KL estimator everywhere, ``kl_k3``: k3 of KL(pi || pi_ref) (Schulman 2020, DeepSeekMath),
      ``exp(d) - d - 1`` with ``d = ref_logprobs - logprobs``; unbiased under samples from pi.
    * One aggregation, ``aggregate_token_loss``: sum over action tokens divided by the number of action
      tokens in the whole optimizer batch (all micro-batches, all ranks), supplied by the caller. The
      per-micro-batch scalars therefore *sum* to the token mean over the optimizer batch; every scalar
      in ``PolicyLossOutput`` follows that rule.
    * Per-token outputs are only meaningful on action positions; aggregation ignores the others.

Shape notation
    N  rows (completions) in a micro-batch
    T  action positions per row (next-token positions), aligned with ``action_mask``
    B  preference pairs (DPO)
    ``action_mask`` (N, T) is bool or float; a nonzero entry marks a generated (action) token.
    ``turn_ids`` (N, T) int64 holds the turn index of each action token and -1 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IMPORTANCE_SAMPLING_LEVELS = ("token", "turn", "trajectory")


def _check_choice(name: str, value: object, valid) -> None:
    """Raise ValueError naming ``name`` and listing ``valid`` when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, valid))}.")


def _check_normalizer(num_tokens_normalizer: float | Tensor) -> None:
    """A Python-number normaliser must be positive; a tensor one is trusted (checking it would sync the device)."""
    if not isinstance(num_tokens_normalizer, Tensor) and not num_tokens_normalizer > 0:
        raise ValueError(
            f"num_tokens_normalizer must be > 0 (the number of action tokens in the optimizer batch), "
            f"got {num_tokens_normalizer!r}."
        )


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: ``exp(d) - d - 1`` with ``d = ref_logprobs - logprobs``.

    Non-negative, and unbiased for KL(pi || pi_ref) when tokens are sampled from pi. Gradients flow
    through both arguments (callers pass a detached ``ref_logprobs``).

    Args:
        logprobs: (N, T) log pi of the sampled tokens.
        ref_logprobs: (N, T) log pi_ref of the same tokens.

    Returns:
        (N, T) per-token estimate, computed at every position (mask before use).
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def aggregate_token_loss(per_token: Tensor, action_mask: Tensor, num_tokens_normalizer: float | Tensor) -> Tensor:
    """The one loss aggregation: ``sum_{action tokens} per_token / num_tokens_normalizer``.

    ``num_tokens_normalizer`` is the number of action tokens in the whole optimizer batch (across
    micro-batches and ranks), so the scalars of the micro-batches sum to the optimizer-batch token mean.
    Non-action positions are excluded with ``torch.where``, so non-finite padding cannot leak in.

    Args:
        per_token: (N, T).
        action_mask: (N, T).
        num_tokens_normalizer: positive number or 0-d tensor.

    Returns:
        0-d tensor.
    """
    _check_normalizer(num_tokens_normalizer)
    return torch.where(action_mask.bool(), per_token, 0.0).sum() / num_tokens_normalizer


def _pool_token(log_ratio: Tensor, mask: Tensor, turn_ids: Tensor | None) -> Tensor:
    """(N, T) -> (N, T): the per-token log-ratio, 0 off action tokens."""
    return torch.where(mask, log_ratio, 0.0)


def _pool_trajectory(log_ratio: Tensor, mask: Tensor, turn_ids: Tensor | None) -> Tensor:
    """(N, T) -> (N, T): each row's mean log-ratio over its action tokens, on those tokens."""
    masked = torch.where(mask, log_ratio, 0.0)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    return torch.where(mask, masked.sum(dim=1, keepdim=True) / count, 0.0)


def _pool_turn(log_ratio: Tensor, mask: Tensor, turn_ids: Tensor | None) -> Tensor:
    """(N, T) -> (N, T): each (row, turn)'s mean log-ratio, scattered back onto the turn's action tokens."""
    if turn_ids is None:
        raise ValueError('turn_ids is required for importance_sampling_level="turn".')
    if turn_ids.shape != mask.shape:
        raise ValueError(
            f"turn_ids must have the shape of action_mask {tuple(mask.shape)}, got {tuple(turn_ids.shape)}."
        )
    ids = torch.where(mask, turn_ids.long(), 0)
    if bool((ids < 0).any()):
        raise ValueError("turn_ids holds a negative turn index on an action token; action tokens need ids >= 0.")
    num_turns = int(ids.max()) + 1 if ids.numel() else 1
    masked = torch.where(mask, log_ratio, 0.0)
    sums = torch.zeros(mask.shape[0], num_turns, dtype=log_ratio.dtype, device=log_ratio.device)
    sums = sums.scatter_add(1, ids, masked)
    counts = torch.zeros_like(sums).scatter_add(1, ids, mask.to(log_ratio.dtype)).clamp(min=1.0)
    return torch.where(mask, (sums / counts).gather(1, ids), 0.0)


_POOLERS: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "token": _pool_token,
    "turn": _pool_turn,
    "trajectory": _pool_trajectory,
}


def pool_log_ratio(log_ratio: Tensor, action_mask: Tensor, level: str, turn_ids: Tensor | None = None) -> Tensor:
    """Pool the per-token log importance ratio at the importance-sampling level.

    * "token": unchanged.
    * "trajectory" (GSPO): every action token of row i gets ``mean_{t in row i} log_ratio_it``, the log
      of the length-normalised sequence ratio; the gradient reaches every token of the row.
    * "turn": the same mean taken per turn (tokens sharing a ``turn_ids`` value within a row).

    Args:
        log_ratio: (N, T) ``logprobs - old_logprobs``.
        action_mask: (N, T).
        level: "token", "turn" or "trajectory".
        turn_ids: (N, T), required for "turn".

    Returns:
        (N, T) pooled log-ratio on action tokens, 0 elsewhere.
    """
    _check_choice("importance_sampling_level", level, _POOLERS)
    return _POOLERS[level](log_ratio, action_mask.bool(), turn_ids)


def resolve_clip_bounds(clip_coef: float | tuple[float, float]) -> tuple[float, float]:
    """Turn the spec's ``clip_coef`` into ratio bounds ``(ratio_low, ratio_high)``.

    A scalar eps in (0, 1) maps to ``(1 - eps, 1 + eps)``; a pair ``(clip_coef_min, clip_coef_max)`` is
    taken as ratio bounds and must satisfy ``0 < min < 1 < max``.
    """
    if isinstance(clip_coef, bool):
        raise ValueError(f"clip_coef must be a float in (0, 1) or a pair (min, max), got {clip_coef!r}.")
    if isinstance(clip_coef, (int, float)):
        if not 0.0 < clip_coef < 1.0:
            raise ValueError(
                f"clip_coef as a scalar must be in (0, 1) (ratio bounds 1 -/+ clip_coef), got {clip_coef}."
            )
        return 1.0 - float(clip_coef), 1.0 + float(clip_coef)
    if isinstance(clip_coef, (tuple, list)) and len(clip_coef) == 2:
        try:
            low, high = (float(bound) for bound in clip_coef)
        except (TypeError, ValueError):
            raise ValueError(f"clip_coef as a pair must hold two numbers, got {clip_coef!r}.") from None
        if not 0.0 < low < 1.0 < high:
            raise ValueError(
                f"clip_coef as a pair (clip_coef_min, clip_coef_max) must satisfy 0 < min < 1 < max, got {clip_coef}."
            )
        return low, high
    raise ValueError(f"clip_coef must be a float in (0, 1) or a pair (min, max), got {clip_coef!r}.")


def _check_bounds(ratio_low: float, ratio_high: float) -> None:
    """Ratio bounds must satisfy 0 <= ratio_low < ratio_high."""
    if not 0.0 <= ratio_low < ratio_high:
        raise ValueError(
            f"ratio_low and ratio_high must satisfy 0 <= ratio_low < ratio_high, got ({ratio_low}, {ratio_high}); "
            "build them from clip_coef with resolve_clip_bounds."
        )


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, ratio_low: float, ratio_high: float
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token: ``-min(r A, clamp(r, ratio_low, ratio_high) A)``, ``r = exp(log_ratio)``.

    Args:
        log_ratio: (N, T) (pooled) log importance ratio.
        advantages: (N, T).
        ratio_low, ratio_high: ratio bounds, e.g. (0.8, 1.2).

    Returns:
        per_token_loss (N, T) and clipped (N, T) bool: True where the clipped branch is strictly the
        minimum, i.e. ``r > ratio_high`` with ``A > 0`` or ``r < ratio_low`` with ``A < 0`` (no gradient).
    """
    _check_bounds(ratio_low, ratio_high)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped_term = ratio.clamp(ratio_low, ratio_high) * advantages
    return -torch.minimum(unclipped, clipped_term), clipped_term < unclipped


def cispo_objective(
    logprobs: Tensor, log_ratio: Tensor, advantages: Tensor, ratio_low: float, ratio_high: float
) -> tuple[Tensor, Tensor]:
    """CISPO per token: ``-sg(clamp(r, ratio_low, ratio_high)) * A * logprobs``, ``r = exp(log_ratio)``.

    The clamped importance weight is detached, so ``d loss / d logprobs = -clamp(r) * A`` and no token
    loses its gradient to clipping.

    Args:
        logprobs: (N, T) log pi of the sampled tokens (carries the gradient).
        log_ratio: (N, T) (pooled) log importance ratio.
        advantages: (N, T).
        ratio_low, ratio_high: ratio bounds.

    Returns:
        per_token_loss (N, T) and clipped (N, T) bool: True where the weight was clamped (r outside the bounds).
    """
    _check_bounds(ratio_low, ratio_high)
    ratio = torch.exp(log_ratio.detach())
    weight = ratio.clamp(ratio_low, ratio_high)
    return -(weight * advantages * logprobs), (ratio < ratio_low) | (ratio > ratio_high)


def _surrogate_objective(
    logprobs: Tensor, log_ratio: Tensor, advantages: Tensor, ratio_low: float, ratio_high: float
) -> tuple[Tensor, Tensor]:
    """``clipped_surrogate`` with the table's signature (the surrogate does not use ``logprobs`` directly)."""
    return clipped_surrogate(log_ratio, advantages, ratio_low, ratio_high)


# loss_type -> fn(logprobs, log_ratio, advantages, ratio_low, ratio_high) -> (per_token_loss, clipped).
POLICY_OBJECTIVES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "grpo": _surrogate_objective,
    "gspo": _surrogate_objective,
    "cispo": cispo_objective,
}


def resolve_importance_sampling_level(loss_type: str, requested: str | None) -> tuple[str, str | None]:
    """Resolve ``importance_sampling_level`` for a ``loss_type``.

    None resolves to "token", except for "gspo", which always uses "trajectory"; when "gspo" meets an
    explicitly requested other level, the returned message says so (the caller warns with it).

    Returns:
        (level, warning message or None).
    """
    _check_choice("loss_type", loss_type, POLICY_OBJECTIVES)
    if requested is not None:
        _check_choice("importance_sampling_level", requested, IMPORTANCE_SAMPLING_LEVELS)
    if loss_type == "gspo":
        if requested not in (None, "trajectory"):
            return "trajectory", (
                f'loss_type="gspo" pools the importance ratio over the trajectory; importance_sampling_level='
                f'{requested!r} is ignored and "trajectory" is used. Use loss_type="grpo" to choose another level.'
            )
        return "trajectory", None
    return ("token" if requested is None else requested), None


def vllm_importance_weights(
    trainer_logprobs: Tensor, sampling_logprobs: Tensor, cap: float, action_mask: Tensor | None = None
) -> Tensor:
    """Rollout/trainer mismatch weights: ``min(exp(trainer_logprobs - sampling_logprobs), cap)``, detached.

    Both log-probs must come from the same sampling processing (temperature / top-k / top-p). With an
    ``action_mask``, non-action positions get weight 0 (their difference is never exponentiated);
    without one, every position is computed.

    Args:
        trainer_logprobs: (N, T) log-probs of the sampled tokens under the trainer's policy.
        sampling_logprobs: (N, T) log-probs reported by the rollout engine.
        cap: upper clamp (spec: ``vllm_importance_sampling_cap``), > 0.
        action_mask: optional (N, T).

    Returns:
        (N, T) detached weights.
    """
    if isinstance(cap, bool) or not cap > 0:
        raise ValueError(f"cap (vllm_importance_sampling_cap) must be > 0, got {cap!r}.")
    diff = (trainer_logprobs - sampling_logprobs).detach()
    if action_mask is None:
        return torch.exp(diff).clamp(max=cap)
    mask = action_mask.bool()
    return torch.where(mask, torch.exp(torch.where(mask, diff, 0.0)).clamp(max=cap), 0.0)


@dataclass(frozen=True)
class PolicyLossOutput:
    """Result of ``grpo_policy_loss``; every scalar is normalised by ``num_tokens_normalizer``.

    Attributes:
        loss: differentiable scalar, policy term + beta * KL term (no KL term under advantage shaping).
        policy_loss: detached policy term (includes the token weights).
        kl: detached sum of k3 over action tokens / normaliser (0 without ``ref_logprobs``).
        clip_fraction: detached number of clipped action tokens / normaliser.
        ratio_mean: detached sum of the (pooled) importance ratio over action tokens / normaliser.
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    clip_fraction: Tensor
    ratio_mean: Tensor


def _check_policy_loss_args(loss_type: str, level: str, beta: float, num_tokens_normalizer: float | Tensor) -> None:
    """Validate the scalar arguments of ``grpo_policy_loss``; raises ValueError naming the argument."""
    _check_choice("loss_type", loss_type, POLICY_OBJECTIVES)
    _check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    if loss_type == "gspo" and level != "trajectory":
        raise ValueError(
            f'loss_type="gspo" requires importance_sampling_level="trajectory", got {level!r}; '
            "resolve it with resolve_importance_sampling_level."
        )
    if isinstance(beta, bool) or not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}.")
    _check_normalizer(num_tokens_normalizer)


def grpo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    action_mask: Tensor,
    *,
    loss_type: str,
    ratio_low: float,
    ratio_high: float,
    beta: float,
    num_tokens_normalizer: float | Tensor,
    importance_sampling_level: str = "token",
    turn_ids: Tensor | None = None,
    use_kl_advantage_shaping: bool = False,
    token_weights: Tensor | None = None,
) -> PolicyLossOutput:
    """The GRPO / GSPO / CISPO objective of one micro-batch.

    Steps: log-ratio on action tokens -> pool at ``importance_sampling_level`` -> (optional) KL shaping
    ``A <- A - beta * sg(k3)`` -> ``POLICY_OBJECTIVES[loss_type]`` -> multiply by ``token_weights`` ->
    aggregate -> add ``beta * aggregate(k3)`` unless shaping. Non-action positions are zeroed (by the
    pooling, and before ``kl_k3``) ahead of any ``exp``, so padding values cannot overflow or turn gradients NaN.

    Args:
        logprobs: (N, T) current policy log-probs (differentiable).
        old_logprobs: (N, T) behaviour-policy log-probs (detached).
        ref_logprobs: (N, T) reference log-probs (detached) or None (no KL).
        advantages: (N, T) token advantages.
        action_mask: (N, T).
        loss_type: key of ``POLICY_OBJECTIVES``; "gspo" requires ``importance_sampling_level="trajectory"``.
        ratio_low, ratio_high: ratio bounds (``resolve_clip_bounds``).
        beta: KL coefficient, >= 0.
        num_tokens_normalizer: action tokens in the whole optimizer batch.
        importance_sampling_level: "token", "turn" or "trajectory".
        turn_ids: (N, T), required for the "turn" level.
        use_kl_advantage_shaping: subtract beta * k3 from the advantages instead of adding a KL loss.
        token_weights: optional (N, T) per-token weights (vLLM IS correction), detached, applied to the policy term.

    Returns:
        PolicyLossOutput.
    """
    _check_policy_loss_args(loss_type, importance_sampling_level, beta, num_tokens_normalizer)
    mask = action_mask.bool()
    log_ratio = pool_log_ratio(logprobs - old_logprobs, mask, importance_sampling_level, turn_ids)
    kl_tokens = None
    if ref_logprobs is not None:
        kl_tokens = kl_k3(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0))
    if use_kl_advantage_shaping and kl_tokens is not None and beta > 0:
        advantages = advantages - beta * kl_tokens.detach()
    per_token, clipped = POLICY_OBJECTIVES[loss_type](logprobs, log_ratio, advantages, ratio_low, ratio_high)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    policy_loss = aggregate_token_loss(per_token, mask, num_tokens_normalizer)
    loss = policy_loss
    if kl_tokens is not None:
        kl = aggregate_token_loss(kl_tokens, mask, num_tokens_normalizer)
        if beta > 0 and not use_kl_advantage_shaping:
            loss = loss + beta * kl
        kl = kl.detach()
    else:
        kl = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)
    return PolicyLossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl=kl,
        clip_fraction=aggregate_token_loss(clipped.to(policy_loss.dtype), mask, num_tokens_normalizer).detach(),
        ratio_mean=aggregate_token_loss(torch.exp(log_ratio.detach()), mask, num_tokens_normalizer),
    )


def _dpo_sigmoid(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """(B,) -> (B,): DPO's logistic loss with conservative label smoothing."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def _dpo_ipo(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """(B,) -> (B,): IPO's squared distance of the margin to 1 / (2 beta)."""
    return (logits - 1.0 / (2.0 * beta)).pow(2)


def _dpo_hinge(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """(B,) -> (B,): SLiC's hinge on the scaled margin."""
    return torch.relu(1.0 - beta * logits)


# loss_type -> fn(logits, beta, label_smoothing) -> (B,) losses, with logits the policy-minus-reference margin.
DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation losses on sequence log-probs.

    With margin ``h = (pc - pr) - (rc - rr)``:
    * "sigmoid" (DPO, Rafailov et al. 2023), with conservative label smoothing eps:
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
    * "ipo" (Azar et al. 2023): ``(h - 1 / (2 beta))^2``;
    * "hinge" (SLiC): ``relu(1 - beta h)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference.
        beta: > 0.
        loss_type: key of ``DPO_LOSSES``.
        label_smoothing: in [0, 0.5); only "sigmoid" supports a nonzero value.

    Returns:
        losses (B,), chosen_rewards (B,) = ``beta (pc - rc)`` and rejected_rewards (B,) = ``beta (pr - rr)``,
        the rewards detached.
    """
    _check_choice("loss_type", loss_type, DPO_LOSSES)
    if isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}.")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f'label_smoothing is only supported with loss_type="sigmoid", got loss_type={loss_type!r}.')
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = DPO_LOSSES[loss_type](logits, beta, label_smoothing)
    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    return losses, chosen_rewards, rejected_rewards


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip_range: float | None,
    num_tokens_normalizer: float | Tensor,
) -> Tensor:
    """PPO value loss with value clipping, aggregated like the policy loss.

    ``0.5 * max((V - R)^2, (V_old + clamp(V - V_old, -c, c) - R)^2)`` per action token; with
    ``clip_range=None`` the plain ``0.5 * (V - R)^2``.

    Args:
        values: (N, T) current value estimates (differentiable).
        old_values: (N, T) value estimates at rollout time (detached).
        returns: (N, T) targets (detached).
        action_mask: (N, T).
        clip_range: c > 0, or None.
        num_tokens_normalizer: action tokens in the whole optimizer batch.

    Returns:
        0-d tensor.
    """
    unclipped = (values - returns).pow(2)
    if clip_range is None:
        per_token = 0.5 * unclipped
    else:
        if isinstance(clip_range, bool) or not clip_range > 0:
            raise ValueError(f"clip_range must be > 0 or None, got {clip_range!r}.")
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        per_token = 0.5 * torch.maximum(unclipped, (clipped_values - returns).pow(2))
    return aggregate_token_loss(per_token, action_mask, num_tokens_normalizer)


def sft_loss(logprobs: Tensor, loss_mask: Tensor, num_tokens_normalizer: float | Tensor) -> Tensor:
    """Supervised fine-tuning: negative log-likelihood of the completion tokens, aggregated like every loss.

    Args:
        logprobs: (N, T) log-probs of each next token (differentiable).
        loss_mask: (N, T), nonzero where the next token is a completion token (prompt and padding excluded).
        num_tokens_normalizer: completion tokens in the whole optimizer batch.

    Returns:
        0-d tensor; the micro-batch scalars sum to the optimizer batch's mean NLL per completion token.
    """
    return aggregate_token_loss(-logprobs, loss_mask, num_tokens_normalizer)


def sequence_logprobs(logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """Log-probability of each row's completion: the sum of its masked token log-probs.

    Args:
        logprobs: (N, T).
        loss_mask: (N, T), nonzero on completion tokens.

    Returns:
        (N,) summed log-probs (0 for a row without completion tokens).
    """
    return torch.where(loss_mask.bool(), logprobs, 0.0).sum(dim=1)
