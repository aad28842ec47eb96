"""Tests for agilerl_llm.losses: each function against a slow loop reference, plus edge cases.

The references loop over rows and tokens with plain arithmetic on 0-d tensors, so their gradients can
be compared with torch.autograd.grad.
"""

from __future__ import annotations

import math

import pytest
import torch

from agilerl_llm.losses import (
    DPO_LOSSES,
    POLICY_OBJECTIVES,
    aggregate_token_loss,
    cispo_objective,
    clipped_surrogate,
    clipped_value_loss,
    dpo_loss,
    grpo_policy_loss,
    kl_k3,
    pool_log_ratio,
    resolve_clip_bounds,
    resolve_importance_sampling_level,
    vllm_importance_weights,
)

N, T, K = 12, 7, 3
EMPTY_ROWS = (3, 9)
DTYPE = torch.float64
LOW, HIGH = 0.8, 1.25


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


def randn(*shape, seed: int, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=DTYPE) * scale).requires_grad_(requires_grad)


def grad_of(output: torch.Tensor, inputs, weight: torch.Tensor | float = 1.0):
    """Gradient of the weighted sum of ``output`` (a random vector-Jacobian product)."""
    return torch.autograd.grad((output * weight).sum(), inputs, retain_graph=True, allow_unused=True)


def stack2d(rows) -> torch.Tensor:
    return torch.stack([torch.stack(row) for row in rows])


def make_logprobs(seed: int, mask: torch.Tensor):
    """logprobs (leaf), old and ref log-probs near it on action tokens, and garbage on non-action tokens."""
    logprobs = (-randn(N, T, seed=seed).abs()).requires_grad_(True)
    old = logprobs.detach() + randn(N, T, seed=seed + 1, scale=0.3)
    ref = logprobs.detach() + randn(N, T, seed=seed + 2, scale=0.5)
    old = torch.where(mask, old, -torch.inf)  # an unmasked difference would give inf and NaN gradients
    ref = torch.where(mask, ref, torch.inf)
    return logprobs, old, ref


# ---------------------------------------------------------------- loop references


def ref_k3(logprob, ref_logprob):
    d = ref_logprob - logprob
    return torch.exp(d) - d - 1


def ref_pool(log_ratio, mask, level, turn_ids=None):
    out = [[torch.zeros((), dtype=DTYPE)] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            if not mask[i, t]:
                continue
            if level == "token":
                unit = [t]
            elif level == "trajectory":
                unit = [u for u in range(T) if mask[i, u]]
            else:
                unit = [u for u in range(T) if mask[i, u] and turn_ids[i, u] == turn_ids[i, t]]
            out[i][t] = sum(log_ratio[i, u] for u in unit) / len(unit)
    return stack2d(out)


def ref_policy_loss(logprobs, old, ref, adv, mask, turn_ids, *, loss_type, level, beta, shaping, weights, norm):
    """Token by token: pooled ratio, k3, (shaped) advantage, objective, weight; sums divided by norm."""
    policy = kl_sum = clipped = ratio_sum = 0.0
    for i in range(N):
        for t in range(T):
            if not mask[i, t]:
                continue
            if level == "token":
                unit = [t]
            elif level == "trajectory":
                unit = [u for u in range(T) if mask[i, u]]
            else:
                unit = [u for u in range(T) if mask[i, u] and turn_ids[i, u] == turn_ids[i, t]]
            log_r = sum(logprobs[i, u] - old[i, u] for u in unit) / len(unit)
            ratio = torch.exp(log_r)
            kl = ref_k3(logprobs[i, t], ref[i, t]) if ref is not None else torch.zeros((), dtype=DTYPE)
            a = adv[i, t] - beta * kl.detach() if shaping else adv[i, t]
            if loss_type == "cispo":
                r = ratio.item()
                term = -min(max(r, LOW), HIGH) * a * logprobs[i, t]
                is_clipped = r < LOW or r > HIGH
            else:
                plain, clamped = ratio * a, ratio.clamp(LOW, HIGH) * a
                term = -torch.minimum(plain, clamped)
                is_clipped = bool(clamped < plain)
            policy = policy + term * (1.0 if weights is None else weights[i, t])
            kl_sum = kl_sum + kl
            clipped += is_clipped
            ratio_sum += ratio.item()
    loss = policy / norm + (beta * kl_sum / norm if (beta > 0 and not shaping and ref is not None) else 0.0)
    return loss, policy / norm, kl_sum / norm, clipped / norm, ratio_sum / norm


# ---------------------------------------------------------------- KL


def test_kl_k3_matches_loop():
    mask, _ = make_layout()
    logprobs, _, ref = make_logprobs(0, mask)
    ref = torch.where(mask, ref, -0.5).requires_grad_(True)
    out = kl_k3(logprobs, ref)
    expected = stack2d([[ref_k3(logprobs[i, t], ref[i, t]) for t in range(T)] for i in range(N)])
    torch.testing.assert_close(out, expected)
    assert bool((out >= 0).all())
    weight = randn(N, T, seed=5)
    for got, want in zip(
        grad_of(out, (logprobs, ref), weight), grad_of(expected, (logprobs, ref), weight), strict=True
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_kl_k3_is_unbiased_for_kl_pi_to_ref(seed):
    """E_{x ~ pi}[k3(log pi(x), log ref(x))] = KL(pi || ref), computed exactly over a small vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    log_pi = torch.log_softmax(torch.randn(5, generator=gen, dtype=DTYPE) * 1.5, dim=0)
    log_ref = torch.log_softmax(torch.randn(5, generator=gen, dtype=DTYPE) * 1.5, dim=0)
    pi, ref = log_pi.exp(), log_ref.exp()
    expectation = sum(pi[x] * kl_k3(log_pi[x], log_ref[x]) for x in range(5))
    kl_pi_ref = sum(pi[x] * (log_pi[x] - log_ref[x]) for x in range(5))
    kl_ref_pi = sum(ref[x] * (log_ref[x] - log_pi[x]) for x in range(5))
    swapped = sum(pi[x] * kl_k3(log_ref[x], log_pi[x]) for x in range(5))
    torch.testing.assert_close(expectation, kl_pi_ref)
    # The test can tell the directions apart: the reverse KL and the swapped estimator both differ.
    assert abs(float(kl_pi_ref - kl_ref_pi)) > 1e-3
    assert abs(float(swapped - kl_pi_ref)) > 1e-3


# ---------------------------------------------------------------- aggregation


def test_aggregate_token_loss_matches_loop_and_ignores_padding():
    mask, _ = make_layout()
    per_token = randn(N, T, seed=6, requires_grad=True)
    padded = torch.where(mask, per_token, torch.inf)
    out = aggregate_token_loss(padded, mask.float(), 50.0)
    expected = sum(per_token[i, t] for i in range(N) for t in range(T) if mask[i, t]) / 50.0
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_of(out, per_token)[0], grad_of(expected, per_token)[0])


def test_micro_batch_losses_sum_to_the_token_mean():
    mask, _ = make_layout()
    per_token = randn(N, T, seed=7)
    total = int(mask.sum())
    parts = [aggregate_token_loss(per_token[s : s + 5], mask[s : s + 5], total) for s in range(0, N, 5)]
    torch.testing.assert_close(sum(parts), per_token[mask].mean())


def test_aggregate_token_loss_bad_normalizer():
    for bad in (0, -3.0):
        with pytest.raises(ValueError, match="num_tokens_normalizer"):
            aggregate_token_loss(torch.zeros(2, 2), torch.ones(2, 2), bad)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("level", ["token", "turn", "trajectory"])
def test_pool_log_ratio_matches_loop(level):
    mask, turn_ids = make_layout()
    log_ratio = randn(N, T, seed=8, requires_grad=True)
    out = pool_log_ratio(log_ratio, mask, level, turn_ids)
    expected = ref_pool(log_ratio, mask, level, turn_ids)
    torch.testing.assert_close(out, expected)
    weight = randn(N, T, seed=9)
    torch.testing.assert_close(grad_of(out, log_ratio, weight)[0], grad_of(expected, log_ratio, weight)[0])


def test_pool_log_ratio_bad_args():
    mask, turn_ids = make_layout()
    with pytest.raises(ValueError, match="importance_sampling_level.*'token'.*'turn'.*'trajectory'"):
        pool_log_ratio(torch.zeros(N, T), mask, "sequence")
    with pytest.raises(ValueError, match="turn_ids"):
        pool_log_ratio(torch.zeros(N, T), mask, "turn")
    bad = turn_ids.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="turn_ids"):
        pool_log_ratio(torch.zeros(N, T), mask, "turn", bad)


# ---------------------------------------------------------------- clip bounds and objectives


@pytest.mark.parametrize(
    ("clip_coef", "expected"), [(0.2, (0.8, 1.2)), ((0.7, 1.3), (0.7, 1.3)), ([0.5, 2.0], (0.5, 2.0))]
)
def test_resolve_clip_bounds(clip_coef, expected):
    assert resolve_clip_bounds(clip_coef) == pytest.approx(expected)


@pytest.mark.parametrize(
    "clip_coef", [0, 0.0, 1.0, 1.5, -0.1, (1.1, 1.3), (0.8, 0.9), (0.0, 1.2), (0.8,), ("a", 1.2), "0.2", True]
)
def test_resolve_clip_bounds_rejects(clip_coef):
    with pytest.raises(ValueError, match="clip_coef"):
        resolve_clip_bounds(clip_coef)


def test_clipped_surrogate_matches_loop():
    log_ratio = randn(N, T, seed=10, scale=0.3, requires_grad=True)
    adv = randn(N, T, seed=11, requires_grad=True)
    loss, clipped = clipped_surrogate(log_ratio, adv, LOW, HIGH)
    ref_loss, ref_clipped = [], []
    for i in range(N):
        row_loss, row_clipped = [], []
        for t in range(T):
            r = torch.exp(log_ratio[i, t])
            plain, clamped = r * adv[i, t], r.clamp(LOW, HIGH) * adv[i, t]
            row_loss.append(-torch.minimum(plain, clamped))
            row_clipped.append((r.item() > HIGH and adv[i, t].item() > 0) or (r.item() < LOW and adv[i, t].item() < 0))
        ref_loss.append(row_loss)
        ref_clipped.append(row_clipped)
    expected = stack2d(ref_loss)
    torch.testing.assert_close(loss, expected)
    assert clipped.tolist() == ref_clipped and 0 < int(clipped.sum()) < N * T
    weight = randn(N, T, seed=12)
    for got, want in zip(
        grad_of(loss, (log_ratio, adv), weight), grad_of(expected, (log_ratio, adv), weight), strict=True
    ):
        torch.testing.assert_close(got, want)
    (grad_ratio,) = grad_of(loss, log_ratio)
    assert bool((grad_ratio[clipped] == 0).all())


def test_cispo_matches_loop():
    logprobs = (-randn(N, T, seed=13).abs()).requires_grad_(True)
    log_ratio = randn(N, T, seed=14, scale=0.3, requires_grad=True)
    adv = randn(N, T, seed=15)
    loss, clipped = cispo_objective(logprobs, log_ratio, adv, LOW, HIGH)
    expected = stack2d(
        [
            [-min(max(math.exp(log_ratio[i, t].item()), LOW), HIGH) * adv[i, t] * logprobs[i, t] for t in range(T)]
            for i in range(N)
        ]
    )
    torch.testing.assert_close(loss, expected)
    ratio = log_ratio.detach().exp()
    assert torch.equal(clipped, (ratio < LOW) | (ratio > HIGH)) and bool(clipped.any())
    weight = randn(N, T, seed=16)
    torch.testing.assert_close(grad_of(loss, logprobs, weight)[0], grad_of(expected, logprobs, weight)[0])
    grad_ratio = grad_of(loss, log_ratio, weight)[0]
    assert grad_ratio is None or bool((grad_ratio == 0).all()), "the CISPO weight must be detached"


def test_cispo_gradient_closed_form():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    log_ratio = torch.log(torch.tensor([[0.5, 1.1, 3.0]]))
    adv = torch.tensor([[2.0, -1.0, 0.5]])
    loss, clipped = cispo_objective(logprobs, log_ratio, adv, 0.8, 1.2)
    # clamp(r) = [0.8, 1.1, 1.2]; loss = -clamp(r) * A * logp; d loss / d logp = -clamp(r) * A
    torch.testing.assert_close(loss, torch.tensor([[1.6, -2.2, 0.3]]))
    assert clipped.tolist() == [[True, False, True]]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.6, 1.1, -0.6]]))


def test_objectives_reject_bad_bounds():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="ratio_low"):
        clipped_surrogate(x, x, 1.2, 0.8)
    with pytest.raises(ValueError, match="ratio_low"):
        cispo_objective(x, x, x, -0.1, 1.2)


def test_policy_objective_table():
    assert set(POLICY_OBJECTIVES) == {"grpo", "gspo", "cispo"}
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge"}


@pytest.mark.parametrize(
    ("loss_type", "requested", "level"),
    [
        ("grpo", None, "token"),
        ("grpo", "turn", "turn"),
        ("grpo", "trajectory", "trajectory"),
        ("cispo", None, "token"),
        ("cispo", "trajectory", "trajectory"),
        ("gspo", None, "trajectory"),
        ("gspo", "trajectory", "trajectory"),
    ],
)
def test_resolve_importance_sampling_level(loss_type, requested, level):
    assert resolve_importance_sampling_level(loss_type, requested) == (level, None)


@pytest.mark.parametrize("requested", ["token", "turn"])
def test_gspo_overrides_an_explicit_level_with_a_message(requested):
    level, message = resolve_importance_sampling_level("gspo", requested)
    assert level == "trajectory"
    assert message is not None and "gspo" in message and repr(requested) in message and "trajectory" in message


def test_resolve_importance_sampling_level_bad_args():
    with pytest.raises(ValueError, match="loss_type.*'grpo'.*'gspo'.*'cispo'"):
        resolve_importance_sampling_level("ppo", None)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        resolve_importance_sampling_level("grpo", "sequence")


# ---------------------------------------------------------------- vLLM IS weights


def test_vllm_importance_weights_matches_loop():
    mask, _ = make_layout()
    trainer = randn(N, T, seed=17, requires_grad=True)
    sampling = trainer.detach() + randn(N, T, seed=18, scale=0.7)
    sampling = torch.where(mask, sampling, -torch.inf)
    out = vllm_importance_weights(trainer, sampling, cap=2.0, action_mask=mask)
    expected = [
        [min(math.exp((trainer[i, t] - sampling[i, t]).item()), 2.0) if mask[i, t] else 0.0 for t in range(T)]
        for i in range(N)
    ]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=DTYPE))
    assert not out.requires_grad and bool((out[mask] == 2.0).any())
    sampling = torch.tensor([[0.0, -1.0, -2.0]])
    unmasked = vllm_importance_weights(torch.tensor([[-1.0, -1.0, -1.0]]), sampling, cap=2.0)
    torch.testing.assert_close(unmasked, torch.tensor([[math.exp(-1.0), 1.0, 2.0]]))


def test_vllm_importance_weights_bad_cap():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="vllm_importance_sampling_cap"):
            vllm_importance_weights(torch.zeros(2), torch.zeros(2), bad)


# ---------------------------------------------------------------- composed objective

COMBOS = [
    ("grpo", "token"),
    ("grpo", "turn"),
    ("grpo", "trajectory"),
    ("gspo", "trajectory"),
    ("cispo", "token"),
    ("cispo", "turn"),
    ("cispo", "trajectory"),
]
SETTINGS = {
    "kl_term": dict(beta=0.04, shaping=False, weights=False, with_ref=True),
    "kl_shaping_weighted": dict(beta=0.5, shaping=True, weights=True, with_ref=True),
    "no_ref": dict(beta=0.04, shaping=False, weights=False, with_ref=False),
    "beta_zero_weighted": dict(beta=0.0, shaping=False, weights=True, with_ref=True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize(("loss_type", "level"), COMBOS)
def test_grpo_policy_loss_matches_loop(loss_type, level, setting):
    cfg = SETTINGS[setting]
    mask, turn_ids = make_layout()
    logprobs, old, ref = make_logprobs(20, mask)
    ref = ref if cfg["with_ref"] else None
    adv = randn(N, T, seed=23)
    weights = torch.rand(N, T, generator=torch.Generator().manual_seed(24), dtype=DTYPE) + 0.5
    weights = weights if cfg["weights"] else None
    norm = float(mask.sum()) + 3.0  # as if another micro-batch held three more action tokens
    out = grpo_policy_loss(
        logprobs, old, ref, adv, mask, loss_type=loss_type, ratio_low=LOW, ratio_high=HIGH, beta=cfg["beta"],
        num_tokens_normalizer=norm, importance_sampling_level=level, turn_ids=turn_ids,
        use_kl_advantage_shaping=cfg["shaping"], token_weights=weights,
    )  # fmt: skip
    loss, policy, kl, clip_fraction, ratio_mean = ref_policy_loss(
        logprobs, old, ref, adv, mask, turn_ids, loss_type=loss_type, level=level, beta=cfg["beta"],
        shaping=cfg["shaping"], weights=weights, norm=norm,
    )  # fmt: skip
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.policy_loss, policy.detach())
    torch.testing.assert_close(out.kl, torch.as_tensor(kl, dtype=DTYPE).detach())
    torch.testing.assert_close(out.clip_fraction, torch.tensor(clip_fraction, dtype=DTYPE))
    torch.testing.assert_close(out.ratio_mean, torch.tensor(ratio_mean, dtype=DTYPE))
    assert not any(x.requires_grad for x in (out.policy_loss, out.kl, out.clip_fraction, out.ratio_mean))
    assert float(out.clip_fraction) > 0, "the inputs should exercise clipping"
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    torch.testing.assert_close(grad, torch.autograd.grad(loss, logprobs)[0])
    assert bool(torch.isfinite(grad).all()) and bool((grad[~mask] == 0).all())


def test_kl_term_and_shaping_change_the_loss():
    mask, _ = make_layout()
    logprobs, old, ref = make_logprobs(30, mask)
    adv = randn(N, T, seed=33)
    kwargs = dict(loss_type="grpo", ratio_low=LOW, ratio_high=HIGH, num_tokens_normalizer=float(mask.sum()))
    plain = grpo_policy_loss(logprobs, old, ref, adv, mask, beta=0.0, **kwargs)
    with_kl = grpo_policy_loss(logprobs, old, ref, adv, mask, beta=0.1, **kwargs)
    shaped = grpo_policy_loss(logprobs, old, ref, adv, mask, beta=0.1, use_kl_advantage_shaping=True, **kwargs)
    torch.testing.assert_close(with_kl.loss, plain.loss + 0.1 * plain.kl)
    assert float(plain.kl) > 0 and not torch.allclose(shaped.loss, plain.loss)
    assert not torch.allclose(shaped.loss, with_kl.loss)


def test_grpo_policy_loss_micro_batches_sum_to_full_batch():
    mask, turn_ids = make_layout()
    logprobs, old, ref = make_logprobs(40, mask)
    adv = randn(N, T, seed=43)
    kwargs = dict(
        loss_type="gspo", ratio_low=LOW, ratio_high=HIGH, beta=0.04, importance_sampling_level="trajectory",
        num_tokens_normalizer=float(mask.sum()),
    )  # fmt: skip
    full = grpo_policy_loss(logprobs, old, ref, adv, mask, **kwargs)
    parts = [
        grpo_policy_loss(logprobs[s : s + 5], old[s : s + 5], ref[s : s + 5], adv[s : s + 5], mask[s : s + 5], **kwargs)
        for s in range(0, N, 5)
    ]
    for field in ("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean"):
        torch.testing.assert_close(sum(getattr(p, field) for p in parts), getattr(full, field))
    grad_full = torch.autograd.grad(full.loss, logprobs)[0]
    grad_parts = torch.autograd.grad(sum(p.loss for p in parts), logprobs)[0]
    torch.testing.assert_close(grad_parts, grad_full)


def test_grpo_policy_loss_bad_args():
    mask, _ = make_layout()
    x = torch.zeros(N, T)
    kwargs = dict(ratio_low=LOW, ratio_high=HIGH, num_tokens_normalizer=10.0)
    with pytest.raises(ValueError, match="loss_type.*'grpo'.*'gspo'.*'cispo'"):
        grpo_policy_loss(x, x, None, x, mask, loss_type="ppo", beta=0.0, **kwargs)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_policy_loss(x, x, None, x, mask, loss_type="gspo", beta=0.0, **kwargs)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_policy_loss(x, x, None, x, mask, loss_type="grpo", beta=0.0, importance_sampling_level="seq", **kwargs)
    with pytest.raises(ValueError, match="beta"):
        grpo_policy_loss(x, x, None, x, mask, loss_type="grpo", beta=-0.1, **kwargs)
    with pytest.raises(ValueError, match="num_tokens_normalizer"):
        grpo_policy_loss(x, x, None, x, mask, loss_type="grpo", beta=0.0, ratio_low=LOW, ratio_high=HIGH,
                         num_tokens_normalizer=0)  # fmt: skip


# ---------------------------------------------------------------- DPO and value loss


def ref_dpo(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    losses = []
    for b in range(pc.shape[0]):
        h = (pc[b] - pr[b]) - (rc[b] - rr[b])
        if loss_type == "sigmoid":
            log_sig = lambda x: -torch.log1p(torch.exp(-x))  # noqa: E731
            losses.append(-(1 - label_smoothing) * log_sig(beta * h) - label_smoothing * log_sig(-beta * h))
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(torch.clamp(1 - beta * h, min=0.0))
    return torch.stack(losses)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_loss_matches_loop(loss_type, label_smoothing):
    pc, pr = randn(9, seed=50, requires_grad=True), randn(9, seed=51, requires_grad=True)
    rc, rr = randn(9, seed=52), randn(9, seed=53)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, 0.5, loss_type, label_smoothing)
    expected = ref_dpo(pc, pr, rc, rr, 0.5, loss_type, label_smoothing)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen, 0.5 * (pc - rc).detach())
    torch.testing.assert_close(rejected, 0.5 * (pr - rr).detach())
    assert not chosen.requires_grad and not rejected.requires_grad
    for got, want in zip(grad_of(losses, (pc, pr)), grad_of(expected, (pc, pr)), strict=True):
        torch.testing.assert_close(got, want)


def test_dpo_sigmoid_at_reference_is_log_two():
    logps = torch.tensor([-3.0, -10.0, -0.2])
    other = torch.tensor([-1.0, -2.0, -7.0])
    losses, chosen, rejected = dpo_loss(logps, other, logps, other, beta=0.3)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0)))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_loss_bad_args():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type.*'sigmoid'.*'ipo'.*'hinge'"):
        dpo_loss(x, x, x, x, 0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, loss_type="ipo", label_smoothing=0.1)


@pytest.mark.parametrize("clip_range", [None, 0.2])
def test_clipped_value_loss_matches_loop(clip_range):
    mask, _ = make_layout()
    values = randn(N, T, seed=60, requires_grad=True)
    old_values = values.detach() + randn(N, T, seed=61, scale=0.4)
    returns = randn(N, T, seed=62)
    out = clipped_value_loss(values, old_values, returns, mask, clip_range, 40.0)
    total = 0.0
    for i in range(N):
        for t in range(T):
            if not mask[i, t]:
                continue
            plain = (values[i, t] - returns[i, t]) ** 2
            if clip_range is None:
                total = total + 0.5 * plain
                continue
            delta = values[i, t] - old_values[i, t]
            clipped = old_values[i, t] + torch.clamp(delta, -clip_range, clip_range)
            total = total + 0.5 * torch.maximum(plain, (clipped - returns[i, t]) ** 2)
    expected = total / 40.0
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_of(out, values)[0], grad_of(expected, values)[0])


def test_clipped_value_loss_bad_clip_range():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="clip_range"):
        clipped_value_loss(x, x, x, x.bool(), 0.0, 4.0)
