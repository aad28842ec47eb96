"""PPO token rewards against naive references, and GAE on a hand-computed PPO example."""

from __future__ import annotations

import pytest
import torch

from agilerl_llm.advantages import gae, kl_penalised_token_rewards, last_action_mask


def test_last_action_mask_matches_loop():
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
    expected = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        positions = [t for t in range(mask.shape[1]) if mask[i, t]]
        if positions:
            expected[i, positions[-1]] = True
    assert torch.equal(last_action_mask(mask), expected)


def test_kl_penalised_token_rewards_matches_loop():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 6, generator=generator) > 0.3
    rewards = torch.randn(4, generator=generator)
    kl = torch.rand(4, 6, generator=generator)
    beta = 0.3
    got = kl_penalised_token_rewards(rewards, mask, kl, beta)
    expected = torch.zeros(4, 6)
    for i in range(4):
        positions = [t for t in range(6) if mask[i, t]]
        for t in positions:
            expected[i, t] = -beta * kl[i, t] + (rewards[i] if t == positions[-1] else 0.0)
    torch.testing.assert_close(got, expected)
    # Without a KL penalty the reward sits once, on the last generated token.
    plain = kl_penalised_token_rewards(rewards, mask)
    torch.testing.assert_close(plain.sum(1), torch.where(mask.any(1), rewards, 0.0))


def test_kl_penalised_token_rewards_bad_args():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="beta"):
        kl_penalised_token_rewards(torch.ones(2), mask, None, -1.0)
    with pytest.raises(ValueError, match="rewards"):
        kl_penalised_token_rewards(torch.ones(3), mask)


def test_gae_over_generated_tokens_hand_computed():
    """Prompt positions 0-1, generated tokens at 2, 3, 4; reward 1 on the last one, KL penalty 0.1 each."""
    mask = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    kl = torch.tensor([[9.0, 9.0, 0.5, 1.0, 0.0]])  # values on prompt positions must be ignored
    rewards = kl_penalised_token_rewards(torch.tensor([1.0]), mask, kl, beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, -0.05, -0.1, 1.0]]))
    values = torch.tensor([[7.0, 7.0, 0.5, 0.4, 0.8]])
    gamma, lam = 0.9, 0.5
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # By hand, backwards over the generated tokens (the episode ends after the last one):
    delta4 = 1.0 - 0.8  # 0.2
    delta3 = -0.1 + 0.9 * 0.8 - 0.4  # 0.22
    delta2 = -0.05 + 0.9 * 0.4 - 0.5  # -0.19
    a4 = delta4
    a3 = delta3 + 0.45 * a4  # 0.31
    a2 = delta2 + 0.45 * a3  # -0.0505
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.0, a2, a3, a4]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.0, a2 + 0.5, a3 + 0.4, a4 + 0.8]]))
