"""PPO token rewards against naive references, and GAE on a hand-computed PPO example."""

from __future__ import annotations

import pytest
import torch

from agilerl_llm.advantages import gae, kl_penalised_token_rewards, last_action_mask, turn_rewards_on_tokens


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


def slow_turn_rewards_on_tokens(turn_rewards, turn_ids, mask):
    """Reference: walk each row; a token ends its turn when no later action token has the same turn id."""
    out = torch.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            turn = int(turn_ids[i, t])
            if not any(mask[i, u] and int(turn_ids[i, u]) == turn for u in range(t + 1, mask.shape[1])):
                out[i, t] = turn_rewards[i, turn]
    return out


def test_turn_rewards_sit_on_the_last_token_of_each_turn():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        num_rows, length, num_turns = 3, 12, 3
        turn_ids = torch.full((num_rows, length), -1)
        mask = torch.zeros(num_rows, length, dtype=torch.bool)
        for i in range(num_rows):  # prompt, then turns of actions separated by environment tokens
            position = int(torch.randint(0, 3, (1,), generator=generator))
            for turn in range(int(torch.randint(1, num_turns + 1, (1,), generator=generator))):
                width = int(torch.randint(1, 3, (1,), generator=generator))
                mask[i, position : position + width], turn_ids[i, position : position + width] = True, turn
                position += width + 1
        present = torch.stack([(turn_ids == k).any(1) for k in range(num_turns)], dim=1)
        turn_rewards = torch.where(present, torch.randn(num_rows, num_turns, generator=generator), 0.0)
        expected = slow_turn_rewards_on_tokens(turn_rewards, turn_ids, mask)
        assert torch.allclose(turn_rewards_on_tokens(turn_rewards, turn_ids, mask), expected)
        kl = torch.rand(num_rows, length, generator=generator)
        got = kl_penalised_token_rewards(turn_rewards, mask, kl, 0.1, turn_ids=turn_ids)
        assert torch.allclose(got, torch.where(mask, expected - 0.1 * kl, 0.0))


def test_turn_rewards_need_turn_ids_and_a_token_for_every_rewarded_turn():
    mask = torch.tensor([[True, True, False, True]])
    turn_ids = torch.tensor([[0, 0, -1, 1]])
    with pytest.raises(ValueError, match="need turn_ids"):
        kl_penalised_token_rewards(torch.ones(1, 2), mask)
    with pytest.raises(ValueError, match="row 0 has a reward for turn 2"):
        turn_rewards_on_tokens(torch.tensor([[1.0, 0.0, 0.5]]), turn_ids, mask)
