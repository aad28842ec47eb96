"""Tests for agilerl_llm.advantages: each function against a slow loop reference, plus edge cases.

The references below loop over rows, groups and tokens with plain Python arithmetic on 0-d tensors,
so they are differentiable and their gradients can be compared with torch.autograd.grad.
"""

from __future__ import annotations

import math

import pytest
import torch

from agilerl_llm.advantages import (
    broadcast_to_tokens,
    clip_advantages,
    compute_grpo_token_advantages,
    gae,
    group_relative_advantages,
    nonzero_advantage_rows,
    resolve_advantage_granularity,
    return_batch_normalisation,
    turn_group_relative_advantages,
    turn_presence,
    whiten_token_advantages,
)

N, G, T, K = 12, 4, 7, 3
EMPTY_ROWS = (3, 9)
DTYPE = torch.float64


def make_layout(seed: int = 0, n: int = N, t: int = T, num_turns: int = K, empty_rows=EMPTY_ROWS):
    """Ragged action masks: row i has 1 + i % num_turns turns of random length, separated by one env token
    and followed by padding; the rows in ``empty_rows`` have no action token at all."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, t, dtype=torch.bool)
    turn_ids = torch.full((n, t), -1, dtype=torch.long)
    for i in range(n):
        if i in empty_rows:
            continue
        turns, position = 1 + i % num_turns, 0
        for k in range(turns):
            room = t - position - 2 * (turns - k - 1)  # keep a token and a gap for each later turn
            length = int(torch.randint(1, min(room, 3) + 1, (1,), generator=gen))
            mask[i, position : position + length] = True
            turn_ids[i, position : position + length] = k
            position += length + 1
    return mask, turn_ids


def randn(*shape, seed: int, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=DTYPE).requires_grad_(requires_grad)


def grad_of(output: torch.Tensor, inputs, weight: torch.Tensor):
    """Gradient of the weighted sum of ``output`` (a random vector-Jacobian product)."""
    return torch.autograd.grad((output * weight).sum(), inputs, retain_graph=True)


# ---------------------------------------------------------------- loop references


def ref_standardise(values: list, norm: str, eps: float) -> list:
    """z-score (population std) or centre a list of 0-d tensors; an all-equal list maps to zeros."""
    if max(float(v.detach()) for v in values) == min(float(v.detach()) for v in values):
        return [torch.zeros((), dtype=DTYPE) for _ in values]
    mean = sum(values) / len(values)
    if norm == "mean_only":
        return [v - mean for v in values]
    std = torch.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + eps) for v in values]


def ref_group_relative(rewards, group_size, norm, eps=1e-6):
    out = []
    for start in range(0, rewards.shape[0], group_size):
        out += ref_standardise([rewards[i] for i in range(start, start + group_size)], norm, eps)
    return torch.stack(out)


def ref_turn_group_relative(turn_rewards, turn_valid, group_size, norm, eps=1e-6):
    out = [[torch.zeros((), dtype=DTYPE) for _ in range(turn_rewards.shape[1])] for _ in range(turn_rewards.shape[0])]
    for start in range(0, turn_rewards.shape[0], group_size):
        for k in range(turn_rewards.shape[1]):
            members = [i for i in range(start, start + group_size) if turn_valid[i, k]]
            if not members:
                continue
            standardised = ref_standardise([turn_rewards[i, k] for i in members], norm, eps)
            for i, value in zip(members, standardised, strict=True):
                out[i][k] = value
    return torch.stack([torch.stack(row) for row in out])


def ref_broadcast(values, mask, turn_ids=None):
    out = torch.zeros(mask.shape, dtype=DTYPE)
    out = [[out[i, t] for t in range(mask.shape[1])] for i in range(mask.shape[0])]
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                out[i][t] = values[i] if values.dim() == 1 else values[i, int(turn_ids[i, t])]
    return torch.stack([torch.stack(row) for row in out])


def ref_whiten(adv, mask, eps):
    chosen = [adv[i, t] for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    mean = sum(chosen) / len(chosen)
    std = torch.sqrt(sum((v - mean) ** 2 for v in chosen) / len(chosen))
    rows = []
    for i in range(mask.shape[0]):
        zero = torch.zeros((), dtype=DTYPE)
        rows.append(torch.stack([(adv[i, t] - mean) / (std + eps) if mask[i, t] else zero for t in range(T)]))
    return torch.stack(rows)


def ref_gae(rewards, values, mask, gamma, lam):
    advantages = [[torch.zeros((), dtype=DTYPE)] * mask.shape[1] for _ in range(mask.shape[0])]
    returns = [[torch.zeros((), dtype=DTYPE)] * mask.shape[1] for _ in range(mask.shape[0])]
    for i in range(mask.shape[0]):
        positions = [t for t in range(mask.shape[1]) if mask[i, t]]
        next_adv, next_value = 0.0, 0.0
        for t in reversed(positions):
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, t]
            advantages[i][t] = next_adv
            returns[i][t] = next_adv + values[i, t]
    stack = lambda rows: torch.stack([torch.stack(row) for row in rows])  # noqa: E731
    return stack(advantages), stack(returns)


# ---------------------------------------------------------------- the layout itself


def test_layout_is_awkward():
    mask, turn_ids = make_layout()
    lengths = mask.sum(dim=1)
    assert all(lengths[i] == 0 for i in EMPTY_ROWS)
    assert len(set(lengths.tolist())) >= 4, "ragged lengths expected"
    assert int(turn_ids.max()) == K - 1, "some row should have three turns"
    assert bool(((turn_ids == -1) & mask).sum() == 0)
    gaps = [i for i in range(N) if mask[i].any() and not mask[i, : int(mask[i].nonzero().max()) + 1].all()]
    assert gaps, "some row should interleave env tokens between turns"


# ---------------------------------------------------------------- group-relative


def rewards_with_constant_group(seed: int = 1) -> torch.Tensor:
    rewards = randn(N, seed=seed)
    rewards[4:8] = 0.1  # a constant group whose float mean is not exactly 0.1
    return rewards.requires_grad_(True)


@pytest.mark.parametrize("adv_norm", ["mean_std", "mean_only"])
def test_group_relative_matches_loop(adv_norm):
    rewards = rewards_with_constant_group()
    out = group_relative_advantages(rewards, G, adv_norm)
    expected = ref_group_relative(rewards, G, adv_norm)
    torch.testing.assert_close(out, expected)
    weight = randn(N, seed=2)
    torch.testing.assert_close(grad_of(out, rewards, weight)[0], grad_of(expected, rewards, weight)[0])


def test_group_relative_uses_population_std():
    out = group_relative_advantages(torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=DTYPE), 2, eps=0.0)
    # population std of {0, 1} is 0.5, so the advantages are -1 and 1 (unbiased std would give -0.707, 0.707).
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, 0.0, 0.0], dtype=DTYPE))


@pytest.mark.parametrize("adv_norm", ["mean_std", "mean_only"])
def test_zero_variance_groups_give_exact_zeros_and_finite_grads(adv_norm):
    rewards = torch.tensor([0.1] * 3 + [1 / 3] * 3 + [7.0] * 3 + [0.0, 1.0, 1.0], dtype=DTYPE, requires_grad=True)
    out = group_relative_advantages(rewards, 3, adv_norm)
    assert torch.equal(out[:9], torch.zeros(9, dtype=DTYPE))
    assert bool((out[9:] != 0).all())
    (grad,) = torch.autograd.grad(out.sum(), rewards)
    assert bool(torch.isfinite(grad).all())


def test_group_relative_bad_args():
    with pytest.raises(ValueError, match="group_size"):
        group_relative_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_relative_advantages(torch.zeros(8), 0)
    with pytest.raises(ValueError, match="adv_norm.*mean_std"):
        group_relative_advantages(torch.zeros(8), 4, adv_norm="std")
    with pytest.raises(ValueError, match="rewards"):
        group_relative_advantages(torch.zeros(8, 2), 4)


# ---------------------------------------------------------------- turn level


def test_turn_presence_matches_loop():
    mask, turn_ids = make_layout()
    expected = torch.tensor([[bool(((turn_ids[i] == k) & mask[i]).any()) for k in range(K)] for i in range(N)])
    assert torch.equal(turn_presence(turn_ids, mask, K), expected)


@pytest.mark.parametrize("adv_norm", ["mean_std", "mean_only"])
def test_turn_group_relative_matches_loop(adv_norm):
    mask, turn_ids = make_layout()
    valid = turn_presence(turn_ids, mask, K)
    turn_rewards = randn(N, K, seed=3)
    turn_rewards[4:8, 0] = 0.3  # a slot whose valid rewards are all equal
    turn_rewards = torch.where(valid, turn_rewards, torch.nan).requires_grad_(True)  # invalid entries are ignored
    out = turn_group_relative_advantages(turn_rewards, valid, G, adv_norm)
    expected = ref_turn_group_relative(turn_rewards, valid, G, adv_norm)
    torch.testing.assert_close(out, expected)
    assert bool((out[~valid] == 0).all()) and bool(out[valid].abs().sum() > 0)
    weight = randn(N, K, seed=4)
    torch.testing.assert_close(grad_of(out, turn_rewards, weight)[0], grad_of(expected, turn_rewards, weight)[0])


def test_turn_group_relative_bad_args():
    with pytest.raises(ValueError, match="turn_valid"):
        turn_group_relative_advantages(torch.zeros(8, 3), torch.ones(8, 2, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="group_size"):
        turn_group_relative_advantages(torch.zeros(6, 3), torch.ones(6, 3, dtype=torch.bool), 4)


# ---------------------------------------------------------------- broadcast, whiten, clip, filter


def test_broadcast_matches_loop():
    mask, turn_ids = make_layout()
    per_row = randn(N, seed=5, requires_grad=True)
    per_turn = randn(N, K, seed=6, requires_grad=True)
    weight = randn(N, T, seed=7)
    out_row, ref_row = broadcast_to_tokens(per_row, mask), ref_broadcast(per_row, mask)
    out_turn, ref_turn = broadcast_to_tokens(per_turn, mask.float(), turn_ids), ref_broadcast(per_turn, mask, turn_ids)
    torch.testing.assert_close(out_row, ref_row)
    torch.testing.assert_close(out_turn, ref_turn)
    torch.testing.assert_close(grad_of(out_row, per_row, weight)[0], grad_of(ref_row, per_row, weight)[0])
    torch.testing.assert_close(grad_of(out_turn, per_turn, weight)[0], grad_of(ref_turn, per_turn, weight)[0])


def test_broadcast_bad_args():
    mask, turn_ids = make_layout()
    with pytest.raises(ValueError, match="turn_ids"):
        broadcast_to_tokens(torch.zeros(N, K), mask)
    bad = turn_ids.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="turn_ids"):
        broadcast_to_tokens(torch.zeros(N, K), mask, bad)
    with pytest.raises(ValueError, match="turn_ids"):
        broadcast_to_tokens(torch.zeros(N, K - 1), mask, turn_ids)
    with pytest.raises(ValueError, match="values"):
        broadcast_to_tokens(torch.zeros(N + 1), mask)


def test_whiten_matches_loop():
    mask, _ = make_layout()
    adv = (randn(N, T, seed=8) * 3 + 2).requires_grad_(True)
    out = whiten_token_advantages(adv, mask, eps=1e-8)
    expected = ref_whiten(adv, mask, eps=1e-8)
    torch.testing.assert_close(out, expected)
    assert bool((out[~mask] == 0).all())
    weight = randn(N, T, seed=9)
    torch.testing.assert_close(grad_of(out, adv, weight)[0], grad_of(expected, adv, weight)[0])


def test_whiten_without_action_tokens_is_zero():
    out = whiten_token_advantages(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 3))


def test_clip_advantages():
    adv = randn(N, T, seed=10) * 3
    assert clip_advantages(adv, None) is adv
    expected = torch.tensor([[min(max(float(v), -1.5), 1.5) for v in row] for row in adv], dtype=DTYPE)
    torch.testing.assert_close(clip_advantages(adv, 1.5), expected)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip_range"):
            clip_advantages(adv, bad)


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_nonzero_advantage_rows_matches_loop(eps):
    mask, _ = make_layout()
    adv = randn(N, T, seed=11)
    adv[0] = 0.0
    adv[1] = 0.25
    expected = torch.tensor([any(abs(float(adv[i, t])) > eps for t in range(T) if mask[i, t]) for i in range(N)])
    assert torch.equal(nonzero_advantage_rows(adv, mask, eps), expected)
    assert not expected[0] and not any(expected[i] for i in EMPTY_ROWS)
    per_row = adv[:, 0]
    assert torch.equal(nonzero_advantage_rows(per_row, eps=eps), per_row.abs() > eps)
    with pytest.raises(ValueError, match="adv_filter_eps"):
        nonzero_advantage_rows(adv, mask, -0.1)


def test_filter_drops_zero_variance_groups():
    mask, _ = make_layout(empty_rows=())
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0] + [1.0] * 4 + [0.0, 0.0, 0.0, 2.0])
    token_adv = compute_grpo_token_advantages(rewards, mask, G)
    keep = nonzero_advantage_rows(token_adv, mask)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4


# ---------------------------------------------------------------- granularity and composition


@pytest.mark.parametrize(
    ("granularity", "level", "expected"),
    [
        ("auto", None, "trajectory"),
        ("auto", "token", "trajectory"),
        ("auto", "trajectory", "trajectory"),
        ("auto", "turn", "turn"),
        ("turn", "token", "turn"),
        ("trajectory", "turn", "trajectory"),
    ],
)
def test_resolve_advantage_granularity(granularity, level, expected):
    assert resolve_advantage_granularity(granularity, level) == expected


def test_resolve_advantage_granularity_bad_args():
    with pytest.raises(ValueError, match="advantage_granularity.*'auto'"):
        resolve_advantage_granularity("token", "token")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        resolve_advantage_granularity("auto", "sequence")


@pytest.mark.parametrize(("whiten", "clip_range"), [(False, None), (True, None), (False, 0.5), (True, 0.7)])
def test_compute_trajectory_matches_loop(whiten, clip_range):
    mask, _ = make_layout()
    rewards = rewards_with_constant_group(seed=12)
    out = compute_grpo_token_advantages(rewards, mask, G, whiten=whiten, clip_range=clip_range)
    expected = ref_broadcast(ref_group_relative(rewards, G, "mean_std"), mask)
    if whiten:
        expected = ref_whiten(expected, mask, eps=1e-6)
    if clip_range is not None:
        expected = expected.clamp(-clip_range, clip_range)
    torch.testing.assert_close(out, expected)


def test_compute_turn_matches_loop():
    mask, turn_ids = make_layout()
    turn_rewards = randn(N, K, seed=13)
    valid = torch.tensor([[bool(((turn_ids[i] == k) & mask[i]).any()) for k in range(K)] for i in range(N)])
    out = compute_grpo_token_advantages(
        turn_rewards, mask, G, granularity="turn", turn_ids=turn_ids, adv_norm="mean_only"
    )
    expected = ref_broadcast(ref_turn_group_relative(turn_rewards, valid, G, "mean_only"), mask, turn_ids)
    torch.testing.assert_close(out, expected)


def test_compute_turn_falls_back_to_trajectory():
    mask, turn_ids = make_layout()
    turn_rewards = randn(N, K, seed=14)
    summed = compute_grpo_token_advantages(turn_rewards.sum(dim=1), mask, G)
    no_ids = compute_grpo_token_advantages(turn_rewards, mask, G, granularity="turn")
    torch.testing.assert_close(no_ids, summed)
    one_d = compute_grpo_token_advantages(turn_rewards[:, 0], mask, G, granularity="turn", turn_ids=turn_ids)
    torch.testing.assert_close(one_d, compute_grpo_token_advantages(turn_rewards[:, 0], mask, G))
    per_turn = compute_grpo_token_advantages(turn_rewards, mask, G, granularity="turn", turn_ids=turn_ids)
    assert not torch.allclose(per_turn, summed)


def test_compute_rejects_unresolved_granularity():
    mask, _ = make_layout()
    with pytest.raises(ValueError, match="granularity"):
        compute_grpo_token_advantages(torch.zeros(N), mask, G, granularity="auto")


# ---------------------------------------------------------------- ReBN and GAE


def test_return_batch_normalisation_matches_loop():
    returns = randn(N, seed=15, requires_grad=True)
    out = return_batch_normalisation(returns)
    expected = torch.stack(ref_standardise([returns[i] for i in range(N)], "mean_std", 1e-6))
    torch.testing.assert_close(out, expected)
    weight = randn(N, seed=16)
    torch.testing.assert_close(grad_of(out, returns, weight)[0], grad_of(expected, returns, weight)[0])


def test_return_batch_normalisation_is_across_batch_not_group():
    returns = torch.tensor([0.0, 1.0, 10.0, 11.0], dtype=DTYPE)
    per_batch = return_batch_normalisation(returns, eps=0.0)
    mean, std = 5.5, math.sqrt(((5.5**2 + 4.5**2) * 2) / 4)
    torch.testing.assert_close(per_batch, (returns - mean) / std)
    assert not torch.allclose(per_batch, group_relative_advantages(returns, 2, eps=0.0))
    assert torch.equal(return_batch_normalisation(torch.full((5,), 0.1)), torch.zeros(5))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.8), (0.5, 0.0)])
def test_gae_matches_loop(gamma, lam):
    mask, _ = make_layout()
    rewards = randn(N, T, seed=17, requires_grad=True)
    values = randn(N, T, seed=18, requires_grad=True)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    weight = randn(N, T, seed=19)
    for got, want in ((adv, ref_adv), (ret, ref_ret)):
        for g_got, g_want in zip(
            grad_of(got, (rewards, values), weight), grad_of(want, (rewards, values), weight), strict=True
        ):
            torch.testing.assert_close(g_got, g_want)


def test_gae_hand_computed_three_tokens():
    # action tokens at positions 0, 2, 3; the env token at 1 and the padding at 4 are skipped.
    mask = torch.tensor([[1, 0, 1, 1, 0]])
    values = torch.tensor([[1.0, 99.0, 2.0, 3.0, 77.0]], dtype=DTYPE)
    rewards = torch.tensor([[0.5, 55.0, 0.0, 1.0, 44.0]], dtype=DTYPE)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # A3 = 1 - 3 = -2;  A2 = (0 + 0.9*3 - 2) + 0.72*(-2) = -0.74;  A0 = (0.5 + 0.9*2 - 1) + 0.72*(-0.74) = 0.7672
    torch.testing.assert_close(adv, torch.tensor([[0.7672, 0.0, -0.74, -2.0, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(ret, torch.tensor([[1.7672, 0.0, 1.26, 1.0, 0.0]], dtype=DTYPE))


def test_gae_bad_args():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, x.bool(), 1.5, 0.9)
    with pytest.raises(ValueError, match="lam"):
        gae(x, x, x.bool(), 0.9, -0.1)
    with pytest.raises(ValueError, match="action_mask"):
        gae(x, x, torch.zeros(2, 4, dtype=torch.bool), 0.9, 0.9)
