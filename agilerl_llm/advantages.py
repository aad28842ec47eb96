"""Advantage estimators for LLM policy optimisation (pure tensor functions).

What lives here
    * Group-relative advantages (GRPO, DeepSeekMath 2024): every prompt is answered ``G`` times and
      each answer's return is standardised within its group, ``A_i = (R_i - mean_g) / (std_g + eps)``.
      The baseline is the group mean, so no critic is needed.
    * Turn-level group-relative advantages: for multi-turn episodes with one reward per turn, turn
      ``k`` of every member of a group is standardised against turn ``k`` of the other members.
    * Return batch normalisation (ReBN, used by LLM REINFORCE): standardise returns across the whole
      batch instead of per group.
    * Generalised advantage estimation (GAE, Schulman et al. 2016) over generated tokens only (PPO).
    * Post-processing: broadcasting to tokens, whitening, clipping, and zero-advantage filtering.

Choices worth knowing
    * The standard deviation is the *population* (biased, divide-by-n) one everywhere in this module.
      It is defined for a group of one and matches "z-score the group". TRL's ``torch.std`` default is
      the unbiased one; the two differ by a factor ``sqrt(G / (G - 1))``.
    * A group (or turn slot, or batch) whose returns are all equal gets advantages of exactly 0, not
      ``0 / eps`` rounding noise: such groups carry no learning signal and ``filter_zero_adv`` relies
      on seeing exact zeros.
    * Values on non-action positions are always 0.

Shape notation
    N  rows in the batch = num_prompts * G; rows ``[g * G, (g + 1) * G)`` are one prompt's group
    G  group size (completions per prompt)
    T  action positions per row (next-token positions), aligned with ``action_mask``
    K  maximum number of turns per row
    ``action_mask`` (N, T) is bool or float; a nonzero entry marks a generated (action) token.
    ``turn_ids`` (N, T) int64 holds the turn index of each action token and -1 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ADV_NORMS = ("mean_std", "mean_only")
ADVANTAGE_GRANULARITIES = ("auto", "trajectory", "turn")
IMPORTANCE_SAMPLING_LEVELS = ("token", "turn", "trajectory")


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    """Raise ValueError naming ``name`` and listing ``valid`` when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, valid))}.")


def _check_group_size(num_rows: int, group_size: int) -> None:
    """``group_size`` must be a positive int dividing the number of rows N."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
    if num_rows % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the number of rows {num_rows}; the batch must hold whole "
            "groups of group_size completions per prompt."
        )


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at 0, where constant groups would otherwise poison backward."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def _check_eps(name: str, eps: float) -> None:
    """Thresholds and stabilisers must be >= 0."""
    if not eps >= 0:
        raise ValueError(f"{name} must be >= 0, got {eps!r}.")


def group_relative_advantages(
    rewards: Tensor, group_size: int, adv_norm: str = "mean_std", eps: float = 1e-6
) -> Tensor:
    """Group-relative advantage of each completion (GRPO).

    ``A_i = R_i - mean_g`` (``adv_norm="mean_only"``) or ``(R_i - mean_g) / (std_g + eps)``
    (``adv_norm="mean_std"``), with ``std_g`` the population standard deviation of the group.
    Groups whose rewards are all equal get exactly 0.

    Args:
        rewards: (N,) one return per completion, groups contiguous.
        group_size: G; must divide N.
        adv_norm: "mean_std" or "mean_only".
        eps: added to the standard deviation.

    Returns:
        (N,) advantages, same dtype as ``rewards``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}.")
    _check_group_size(rewards.shape[0], group_size)
    _check_choice("adv_norm", adv_norm, ADV_NORMS)
    _check_eps("eps", eps)
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if adv_norm == "mean_std":
        std = _safe_sqrt(centred.pow(2).mean(dim=1, keepdim=True))
        centred = centred / (std + eps)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred).reshape(-1)


def turn_group_relative_advantages(
    turn_rewards: Tensor, turn_valid: Tensor, group_size: int, adv_norm: str = "mean_std", eps: float = 1e-6
) -> Tensor:
    """Group-relative advantage per turn: turn k of each member against turn k of its group.

    For every group and turn slot k, the statistics use only the members whose turn k is valid
    (population std). Invalid entries, and slots whose valid rewards are all equal (including a
    slot with a single valid member), get exactly 0.

    Args:
        turn_rewards: (N, K) reward of each turn; invalid entries are ignored (may hold anything finite or not).
        turn_valid: (N, K) bool, True where the row has a turn k.
        group_size: G; must divide N.
        adv_norm: "mean_std" or "mean_only".
        eps: added to the standard deviation.

    Returns:
        (N, K) advantages.
    """
    if turn_rewards.dim() != 2 or turn_valid.shape != turn_rewards.shape:
        raise ValueError(
            f"turn_rewards and turn_valid must both be (N, K); got {tuple(turn_rewards.shape)} and "
            f"{tuple(turn_valid.shape)}."
        )
    _check_group_size(turn_rewards.shape[0], group_size)
    _check_choice("adv_norm", adv_norm, ADV_NORMS)
    _check_eps("eps", eps)
    num_turns = turn_rewards.shape[1]
    valid = turn_valid.bool().reshape(-1, group_size, num_turns)
    rewards = torch.where(valid, turn_rewards.reshape(-1, group_size, num_turns), 0.0)
    weight = valid.to(rewards.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (rewards * weight).sum(dim=1, keepdim=True) / count
    centred = (rewards - mean) * weight
    if adv_norm == "mean_std":
        std = _safe_sqrt(centred.pow(2).sum(dim=1, keepdim=True) / count)
        centred = centred / (std + eps)
    high = torch.where(valid, rewards, -torch.inf).amax(dim=1, keepdim=True)
    low = torch.where(valid, rewards, torch.inf).amin(dim=1, keepdim=True)
    informative = valid & (high > low)
    return torch.where(informative, centred, torch.zeros_like(centred)).reshape(turn_rewards.shape)


def turn_presence(turn_ids: Tensor, action_mask: Tensor, num_turns: int) -> Tensor:
    """Which turns each row has, read from its action tokens.

    Args:
        turn_ids: (N, T) turn index of each action token, -1 elsewhere.
        action_mask: (N, T).
        num_turns: K.

    Returns:
        (N, K) bool, True where row i has at least one action token with turn id k.
    """
    ids = _checked_turn_ids(turn_ids, action_mask, num_turns)
    counts = torch.zeros(ids.shape[0], num_turns, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, ids, action_mask.bool().to(torch.int64))
    return counts > 0


def _checked_turn_ids(turn_ids: Tensor, action_mask: Tensor, num_turns: int | None = None) -> Tensor:
    """Validate ``turn_ids`` on action tokens and return them with non-action positions set to 0, (N, T) int64."""
    if turn_ids.shape != action_mask.shape:
        raise ValueError(
            f"turn_ids must have the shape of action_mask {tuple(action_mask.shape)}, got {tuple(turn_ids.shape)}."
        )
    mask = action_mask.bool()
    ids = torch.where(mask, turn_ids.long(), 0)
    if bool((ids < 0).any()):
        raise ValueError("turn_ids holds a negative turn index on an action token; action tokens need ids >= 0.")
    if num_turns is not None and bool((ids >= num_turns).any()):
        raise ValueError(f"turn_ids holds a turn index >= {num_turns} (the number of turns K) on an action token.")
    return ids


def broadcast_to_tokens(values: Tensor, action_mask: Tensor, turn_ids: Tensor | None = None) -> Tensor:
    """Place per-trajectory or per-turn values onto the action tokens they belong to.

    Args:
        values: (N,) one value per row, copied onto every action token of the row; or (N, K) one
            value per turn, scattered onto the action tokens whose ``turn_ids`` equal k.
        action_mask: (N, T).
        turn_ids: (N, T), required when ``values`` is (N, K).

    Returns:
        (N, T) values on action tokens, 0 elsewhere.
    """
    mask = action_mask.bool()
    if values.dim() == 1:
        if values.shape[0] != mask.shape[0]:
            raise ValueError(f"values has {values.shape[0]} rows but action_mask has {mask.shape[0]}.")
        return torch.where(mask, values[:, None], torch.zeros((), dtype=values.dtype, device=values.device))
    if values.dim() != 2 or values.shape[0] != mask.shape[0]:
        raise ValueError(f"values must be (N,) or (N, K) with N={mask.shape[0]}, got {tuple(values.shape)}.")
    if turn_ids is None:
        raise ValueError("turn_ids is required to broadcast per-turn values of shape (N, K) onto tokens.")
    ids = _checked_turn_ids(turn_ids, mask, values.shape[1])
    return torch.where(mask, values.gather(1, ids), torch.zeros((), dtype=values.dtype, device=values.device))


def whiten_token_advantages(
    advantages: Tensor, action_mask: Tensor, eps: float = 1e-8, *, batch_sum: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Whiten token advantages over the action positions of the batch.

    ``(A - mean) / (std + eps)`` with the masked mean and population std over all action tokens.

    Args:
        advantages: (N, T).
        action_mask: (N, T).
        eps: added to the standard deviation.
        batch_sum: sums a statistic over the whole batch when it is split across processes (each holding some
            of the rows): the mean and std are then the global batch's. None: this tensor is the whole batch.

    Returns:
        (N, T) whitened advantages on action tokens, 0 elsewhere (all zeros when there is no action token).
    """
    _check_eps("eps", eps)
    total = batch_sum or (lambda statistic: statistic)
    mask = action_mask.bool()
    weight = mask.to(advantages.dtype)
    count = total(weight.sum()).clamp(min=1.0)
    masked = torch.where(mask, advantages, 0.0)
    mean = total(masked.sum()) / count
    centred = torch.where(mask, advantages - mean, 0.0)
    std = _safe_sqrt(total(centred.pow(2).sum()) / count)
    return centred / (std + eps)


def clip_advantages(advantages: Tensor, clip_range: float | None) -> Tensor:
    """Clamp advantages to ``[-clip_range, clip_range]`` (spec: ``adv_clip_range``); None returns the input.

    Args:
        advantages: any shape, e.g. (N,) or (N, T).
        clip_range: positive float or None.

    Returns:
        Same shape as ``advantages``.
    """
    if clip_range is None:
        return advantages
    if isinstance(clip_range, bool) or not clip_range > 0:
        raise ValueError(f"clip_range (adv_clip_range) must be > 0 or None, got {clip_range!r}.")
    return advantages.clamp(-clip_range, clip_range)


def nonzero_advantage_rows(advantages: Tensor, action_mask: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """Rows that carry a learning signal, for ``filter_zero_adv``.

    A row is kept when ``|A| > eps`` somewhere on its action tokens; rows with ``|A| <= eps``
    everywhere (and rows without any action token) are dropped.

    Args:
        advantages: (N,) per-row or (N, T) per-token advantages.
        action_mask: (N, T), used for (N, T) advantages; None treats every position as an action token.
        eps: threshold (spec: ``adv_filter_eps``), >= 0.

    Returns:
        (N,) bool, True for rows to keep.
    """
    _check_eps("eps (adv_filter_eps)", eps)
    large = advantages.abs() > eps
    if advantages.dim() == 1:
        return large
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be (N,) or (N, T), got shape {tuple(advantages.shape)}.")
    if action_mask is not None:
        large = large & action_mask.bool()
    return large.any(dim=1)


def resolve_advantage_granularity(advantage_granularity: str, importance_sampling_level: str | None) -> str:
    """Resolve ``advantage_granularity`` to "trajectory" or "turn".

    "auto" follows the importance-sampling level: "turn" when the level is "turn", else "trajectory".
    ``importance_sampling_level=None`` means "token".

    Returns:
        "trajectory" or "turn".
    """
    _check_choice("advantage_granularity", advantage_granularity, ADVANTAGE_GRANULARITIES)
    level = "token" if importance_sampling_level is None else importance_sampling_level
    _check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    if advantage_granularity != "auto":
        return advantage_granularity
    return "turn" if level == "turn" else "trajectory"


def compute_grpo_token_advantages(
    rewards: Tensor,
    action_mask: Tensor,
    group_size: int,
    *,
    adv_norm: str = "mean_std",
    granularity: str = "trajectory",
    turn_ids: Tensor | None = None,
    whiten: bool = False,
    clip_range: float | None = None,
    eps: float = 1e-6,
    batch_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """GRPO token advantages: group-relative -> broadcast to tokens -> optional whitening -> optional clip.

    ``granularity="turn"`` with (N, K) rewards and ``turn_ids`` standardises each turn within its
    group (a turn counts as valid for a row when the row has an action token of that turn) and
    scatters the result onto the turn's tokens. ``granularity="turn"`` without ``turn_ids`` or with
    (N,) rewards falls back to trajectory granularity, and (N, K) rewards at trajectory granularity
    are summed over turns to the episode return, so padded turn entries must be 0. The fallback is
    silent here; the caller warns.

    Args:
        rewards: (N,) per-trajectory or (N, K) per-turn rewards.
        action_mask: (N, T).
        group_size: G.
        adv_norm: "mean_std" or "mean_only".
        granularity: "trajectory" or "turn" (resolve "auto" first with ``resolve_advantage_granularity``).
        turn_ids: (N, T) or None.
        whiten: whiten over action tokens after broadcasting (``whiten_advantages``).
        clip_range: ``adv_clip_range``, applied last.
        eps: added to every standard deviation.
        batch_sum: for whitening a batch split across processes (see ``whiten_token_advantages``); groups never
            span processes, so the group statistics need no reduction.

    Returns:
        (N, T) advantages on action tokens, 0 elsewhere.
    """
    _check_choice("granularity", granularity, ("trajectory", "turn"))
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (N,) or (N, K), got shape {tuple(rewards.shape)}.")
    if granularity == "turn" and rewards.dim() == 2 and turn_ids is not None:
        valid = turn_presence(turn_ids, action_mask, rewards.shape[1])
        per_turn = turn_group_relative_advantages(rewards, valid, group_size, adv_norm, eps)
        token_adv = broadcast_to_tokens(per_turn, action_mask, turn_ids)
    else:
        returns = rewards.sum(dim=1) if rewards.dim() == 2 else rewards
        token_adv = broadcast_to_tokens(group_relative_advantages(returns, group_size, adv_norm, eps), action_mask)
    if whiten:
        token_adv = whiten_token_advantages(token_adv, action_mask, eps, batch_sum=batch_sum)
    return clip_advantages(token_adv, clip_range)


def return_batch_normalisation(
    returns: Tensor, eps: float = 1e-6, *, batch_sum: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Return batch normalisation (ReBN): standardise returns across the whole batch, not per group.

    ``(R_i - mean) / (std + eps)`` with the population std over all N rows; a constant batch gives 0.

    Args:
        returns: (N,).
        eps: added to the standard deviation.
        batch_sum: sums a statistic over the whole batch when its rows are split across processes; None: these
            N rows are the whole batch.

    Returns:
        (N,) normalised returns.
    """
    if returns.dim() != 1:
        raise ValueError(f"returns must be 1-D (N,), got shape {tuple(returns.shape)}.")
    if batch_sum is None:
        return group_relative_advantages(returns, max(returns.shape[0], 1), "mean_std", eps)
    count = batch_sum(torch.tensor(float(returns.shape[0]), dtype=returns.dtype, device=returns.device)).clamp(min=1.0)
    centred = returns - batch_sum(returns.sum()) / count
    std = _safe_sqrt(batch_sum(centred.pow(2).sum()) / count)
    return centred / (std + eps)


def gae(rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the action tokens of each row.

    Non-action positions are skipped: for action token j the next value is the value of the next
    *action* token of the same row, and the episode terminates after the row's last action token
    (bootstrap value 0). Rewards on non-action positions are ignored, so place outcome rewards on
    the last generated token of a completion or turn.

        delta_j = r_j + gamma * V_next(j) - V_j
        A_j     = delta_j + gamma * lam * A_next(j)
        R_j     = A_j + V_j

    Differentiable in its inputs; callers normally pass detached values.

    Args:
        rewards: (N, T) per-token rewards.
        values: (N, T) value estimates.
        action_mask: (N, T).
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        advantages (N, T) and returns (N, T), both 0 on non-action positions.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}.")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}.")
    if rewards.shape != values.shape or rewards.shape != action_mask.shape:
        raise ValueError(
            f"rewards, values and action_mask must share a shape (N, T); got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)} and {tuple(action_mask.shape)}."
        )
    mask = action_mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    columns = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        is_action = mask[:, t]
        columns.append(torch.where(is_action, adv, 0.0))
        next_value = torch.where(is_action, values[:, t], next_value)
        next_adv = torch.where(is_action, adv, next_adv)
    advantages = torch.stack(columns[::-1], dim=1) if columns else torch.zeros_like(values)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def last_action_mask(action_mask: Tensor) -> Tensor:
    """Where each row's last action token is.

    Args:
        action_mask: (N, T).

    Returns:
        (N, T) bool, True only at the last action position of each row (all False for a row without actions).
    """
    mask = action_mask.bool()
    later_actions = mask.flip(1).cumsum(1).flip(1) - mask.long()  # action tokens strictly after position t
    return mask & (later_actions == 0)


def turn_rewards_on_tokens(turn_rewards: Tensor, turn_ids: Tensor, action_mask: Tensor) -> Tensor:
    """Each turn's reward on the last action token of that turn (multi-turn PPO's token rewards).

    Args:
        turn_rewards: (N, K) reward of each turn, 0 for turns a row never reached.
        turn_ids: (N, T) turn index of each action token, -1 elsewhere.
        action_mask: (N, T).

    Returns:
        (N, T) float: ``turn_rewards[i, k]`` at the last position t with ``turn_ids[i, t] == k``, 0 elsewhere.

    Raises:
        ValueError: a nonzero reward belongs to a turn with no action token (it would have nowhere to go).
    """
    num_rows, num_turns = turn_rewards.shape
    ids = _checked_turn_ids(turn_ids, action_mask, num_turns)
    mask = action_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(ids)
    last_position = torch.full((num_rows, num_turns), -1, dtype=torch.int64, device=mask.device)
    last_position.scatter_reduce_(1, ids, torch.where(mask, positions, -1), reduce="amax")
    present = last_position >= 0
    if bool(((turn_rewards != 0) & ~present).any()):
        row, turn = ((turn_rewards != 0) & ~present).nonzero()[0].tolist()
        raise ValueError(f"row {row} has a reward for turn {turn} but no action token in that turn.")
    token_rewards = torch.zeros(mask.shape, dtype=turn_rewards.dtype, device=mask.device)
    token_rewards.scatter_add_(1, last_position.clamp(min=0), torch.where(present, turn_rewards, 0.0))
    return token_rewards


def kl_penalised_token_rewards(
    rewards: Tensor, action_mask: Tensor, kl: Tensor | None = None, beta: float = 0.0, turn_ids: Tensor | None = None
) -> Tensor:
    """Token-level rewards for PPO: the outcome reward on the last generated token, minus a per-token KL penalty.

    ``r_it = R_i * [t is row i's last action token] - beta * kl_it`` on action tokens, 0 elsewhere. The
    outcome reward is placed once, never copied onto every token. Per-turn rewards (N, K) with ``turn_ids`` go
    on the last token of each turn instead (``turn_rewards_on_tokens``), so GAE runs across the turns.

    Args:
        rewards: (N,) one outcome reward per completion, or (N, K) per-turn rewards (then ``turn_ids`` is needed).
        action_mask: (N, T).
        kl: (N, T) per-token KL estimate (e.g. ``losses.kl_k3``, detached) or None.
        beta: KL coefficient, >= 0.
        turn_ids: (N, T) turn index of each action token (-1 elsewhere), with per-turn rewards.

    Returns:
        (N, T) token rewards, 0 on non-action positions.
    """
    if isinstance(beta, bool) or not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}.")
    mask = action_mask.bool()
    if rewards.dim() == 2 and rewards.shape[0] == action_mask.shape[0]:
        if turn_ids is None:
            raise ValueError("per-turn rewards (N, K) need turn_ids to say where each turn ends.")
        token_rewards = turn_rewards_on_tokens(rewards, turn_ids, mask)
    elif rewards.dim() == 1 and rewards.shape[0] == action_mask.shape[0]:
        token_rewards = torch.where(last_action_mask(mask), rewards[:, None], 0.0)
    else:
        raise ValueError(
            f"rewards must be (N,) or (N, K) with N={action_mask.shape[0]}, got shape {tuple(rewards.shape)}."
        )
    if kl is not None and beta > 0:
        token_rewards = token_rewards - beta * torch.where(mask, kl, 0.0)
    return torch.where(mask, token_rewards, 0.0)
