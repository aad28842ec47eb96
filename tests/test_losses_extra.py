"""SFT loss and sequence log-probs against naive references, value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from agilerl_llm.losses import dpo_loss, sequence_logprobs, sft_loss


def _inputs(seed=0, rows=3, width=7):
    generator = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(rows, width, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.rand(rows, width, generator=generator) > 0.4
    mask[0] = False  # a row without completion tokens
    return logprobs, mask


def test_sft_loss_matches_loop_value_and_gradient():
    logprobs, mask = _inputs()
    normalizer = 11.0
    loss = sft_loss(logprobs, mask, normalizer)
    (grad,) = torch.autograd.grad(loss, logprobs)

    reference_input = logprobs.detach().clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                total = total - reference_input[i, t]
    reference = total / normalizer
    (reference_grad,) = torch.autograd.grad(reference, reference_input)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)
    assert torch.all(grad[~mask] == 0)  # prompt and padding positions get exactly zero gradient


def test_sft_loss_equals_cross_entropy_of_logits():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 37, generator=generator, dtype=torch.float64)
    targets = torch.randint(37, (2, 5), generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    logprobs = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(sft_loss(logprobs, mask, float(mask.sum())), expected)


def test_sft_loss_bad_normalizer():
    logprobs, mask = _inputs()
    with pytest.raises(ValueError, match="num_tokens_normalizer"):
        sft_loss(logprobs, mask, 0.0)


def test_sequence_logprobs_matches_loop_value_and_gradient():
    logprobs, mask = _inputs(2)
    logprobs = logprobs.detach().clone()
    logprobs[~mask] = float("-inf")  # padding must not leak
    logprobs.requires_grad_()
    sums = sequence_logprobs(logprobs, mask)
    (grad,) = torch.autograd.grad(sums.sum(), logprobs)
    expected = torch.tensor(
        [sum(float(logprobs.detach()[i, t]) for t in range(mask.shape[1]) if mask[i, t]) for i in range(mask.shape[0])],
        dtype=torch.float64,
    )
    torch.testing.assert_close(sums.detach(), expected)
    torch.testing.assert_close(grad, mask.double())


def test_dpo_on_sequence_logprobs_is_log_two_when_policy_is_reference():
    logprobs, mask = _inputs(3, rows=4)
    sums = sequence_logprobs(logprobs, mask)
    losses, chosen, rejected = dpo_loss(sums[:2], sums[2:], sums[:2].detach(), sums[2:].detach(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0), dtype=torch.float64))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)
