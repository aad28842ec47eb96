"""LLMReinforce: return batch normalisation across the batch, clipping, the KL term and learning a toy task."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm.advantages import return_batch_normalisation
from agilerl_llm.algorithms.experience import Experience
from agilerl_llm.algorithms.grpo import GRPO
from agilerl_llm.algorithms.ppo import LLMPPO
from agilerl_llm.algorithms.reinforce import LLMReinforce
from agilerl_llm.envs.reasoning import ReasoningGym

DATA = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 120, 10) for b in range(3)]


def lowercase_share(completion, answer, prompt):
    return sum(ch.islower() for ch in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    from agilerl_llm.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("peaked_reinforce"), "nano", initializer_range=0.2)


def make_agent(model_dir, tokenizer, **kwargs):
    kwargs = {"group_size": 4, "max_output_tokens": 4, "min_output_tokens": 4, "gradient_checkpointing": False,
              "lr": 1e-2, "batch_size": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0} | kwargs  # fmt: skip
    return LLMReinforce(tokenizer.pad_token_id, tokenizer.pad_token,
                        actor_network=AutoModelForCausalLM.from_pretrained(model_dir), **kwargs)  # fmt: skip


def rollout(agent, tokenizer, prompts=6):
    env = ReasoningGym(DATA, DATA, tokenizer, lowercase_share, data_batch_size_per_gpu=prompts)
    batch = env.reset()
    result = agent.get_action(batch)
    return result, env.score(batch, result)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"group_size": 0}, "group_size"),
        ({"beta": -1.0}, "beta"),
        ({"update_epochs": 0}, "update_epochs"),
        ({"clip_coef": 1.5}, "clip_coef"),
    ],  # fmt: skip
)
def test_bad_arguments_name_the_field(tiny_model_dir, tokenizer, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_agent(tiny_model_dir, tokenizer, **kwargs)


def test_rebn_normalises_across_the_batch_not_per_group(tiny_model_dir, tokenizer):
    """Rewards constant within each group: GRPO would see no signal; ReBN still ranks the groups."""
    agent = make_agent(tiny_model_dir, tokenizer, group_size=2)
    result, _ = rollout(agent, tokenizer, prompts=3)
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 3.0, 3.0])
    batch = Experience.from_input((result.completion_ids, result.action_masks, rewards, result.attention_mask),
                                  agent.pad_token_id, agent.device)  # fmt: skip
    advantages = agent.compute_advantages(batch)
    expected = return_batch_normalisation(rewards)
    for row in range(6):
        assert torch.allclose(
            advantages[row][batch.action_mask[row]], expected[row].expand(int(batch.action_mask[row].sum()))
        )
    assert float(expected.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(expected.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=1e-4)
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    assert metrics["grad_norm"] > 0 and metrics["ratio_mean"] == pytest.approx(1.0)


def test_several_epochs_clip_and_the_kl_term_appears(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, update_epochs=3, batch_size=12, beta=0.1, lr=5e-2)
    result, rewards = rollout(agent, tokenizer)
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    assert metrics["mean_kl"] > 0 and metrics["clip_fraction"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_reinforce_raises_mean_reward(peaked_model_dir, tokenizer):
    agent = make_agent(peaked_model_dir, tokenizer, seed=0)
    env = ReasoningGym(DATA, DATA, tokenizer, lowercase_share, data_batch_size_per_gpu=6)
    prompts = env.reset()
    rewards = []
    for _ in range(12):
        result = agent.get_action(prompts)
        batch_rewards = env.score(prompts, result)
        agent.learn((result.completion_ids, result.action_masks, batch_rewards, result.attention_mask))
        rewards.append(float(batch_rewards.mean()))
        prompts = env.advance()
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > first + 0.4, rewards


@pytest.mark.parametrize("cls", [GRPO, LLMReinforce, LLMPPO])
def test_every_generating_algorithm_rejects_a_bad_generate_chunk_size(cls):
    # The shared check runs before any model is loaded, so the bad value fails first and names itself.
    with pytest.raises(ValueError, match="hf_generate_chunk_size must be >= 1"):
        cls(0, "<pad>", model_name="not-loaded", hf_generate_chunk_size=0)
