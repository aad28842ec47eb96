"""LLMPPO: critic adapter + value head, checkpoint round trip, raising reward and lowering value loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from agilerl_llm.algorithms.ppo import LLMPPO
from agilerl_llm.envs.reasoning import ReasoningGym

DATA = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 120, 10) for b in range(3)]


def lowercase_share(completion, answer, prompt):
    return sum(ch.islower() for ch in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    from agilerl_llm.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("peaked_ppo"), "nano", initializer_range=0.2)


def make_agent(model_dir, tokenizer, **kwargs):
    kwargs = {"group_size": 4, "max_output_tokens": 4, "min_output_tokens": 4, "gradient_checkpointing": False,
              "lr": 1e-2, "batch_size": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "beta": 0.0} | kwargs  # fmt: skip
    return LLMPPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
                  **kwargs)  # fmt: skip


def rollout(agent, tokenizer):
    env = ReasoningGym(DATA, DATA, tokenizer, lowercase_share, data_batch_size_per_gpu=6)
    prompts = env.reset()
    result = agent.get_action(prompts)
    return (result.completion_ids, result.action_masks, env.score(prompts, result), result.attention_mask)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"gamma": 1.5}, "gamma"),
        ({"gae_lambda": -0.1}, "gae_lambda"),
        ({"vf_coef": -1.0}, "vf_coef"),
        ({"cliprange_value": 0.0}, "cliprange_value"),
        ({"clip_coef": 2.0}, "clip_coef"),
    ],  # fmt: skip
)
def test_bad_arguments_name_the_field(tiny_model_dir, tokenizer, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_agent(tiny_model_dir, tokenizer, **kwargs)


def test_the_critic_is_an_adapter_and_the_value_head_is_optimised(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    assert agent.adapter_names() == ("actor", "reference", "critic")
    optimised = {id(p) for group in agent.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in agent.value_head.parameters())
    assert all(id(p) in optimised for p in agent.adapters.parameters("critic"))


def test_learn_moves_actor_critic_and_head_only(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, beta=0.05, update_epochs=2, batch_size=12)
    experience = rollout(agent, tokenizer)
    before = {n: p.detach().clone() for n, p in agent.actor.named_parameters()}
    head = agent.value_head.linear.weight.detach().clone()
    metrics = agent.learn(experience)
    assert {"mean_loss", "value_loss", "policy_loss", "mean_kl", "clip_fraction", "grad_norm"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    after = dict(agent.actor.named_parameters())
    for adapter in (".actor.", ".critic."):
        assert any(not torch.equal(before[n], after[n]) for n in before if adapter in n), adapter
    for name in before:
        if ".actor." not in name and ".critic." not in name:
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(head, agent.value_head.linear.weight)


def test_checkpoint_round_trip_keeps_critic_and_value_head(tiny_model_dir, tokenizer, tmp_path):
    agent = make_agent(tiny_model_dir, tokenizer)
    agent.learn(rollout(agent, tokenizer))
    agent.save_checkpoint(tmp_path / "ppo")
    assert (tmp_path / "ppo" / "critic" / "adapter_model.safetensors").is_file()
    restored = make_agent(tiny_model_dir, tokenizer, seed=7)
    restored.load_checkpoint(tmp_path / "ppo")
    assert torch.equal(restored.value_head.linear.weight, agent.value_head.linear.weight)
    assert torch.equal(restored.value_head.linear.bias, agent.value_head.linear.bias)
    for key, value in agent.adapters.state_dict("critic").items():
        assert torch.equal(restored.adapters.state_dict("critic")[key], value)
    ids, _, _, mask = rollout(agent, tokenizer)
    torch.testing.assert_close(restored.get_values(ids, mask), agent.get_values(ids, mask))
    kept = make_agent(tiny_model_dir, tokenizer, seed=7)
    live_head = kept.value_head.linear.weight.detach().clone()
    kept.load_checkpoint(tmp_path / "ppo", overwrite_critic_adapter=False)
    assert torch.equal(kept.value_head.linear.weight, live_head)


def test_value_loss_falls_on_a_fixed_batch(tiny_model_dir, tokenizer):
    """With gae_lambda=1 and no KL the value targets are the rewards themselves, whatever the policy does."""
    agent = make_agent(tiny_model_dir, tokenizer, lr=5e-3, gae_lambda=1.0, cliprange_value=None)
    ids, action_mask, _, attention_mask = rollout(agent, tokenizer)
    rewards = torch.arange(24, dtype=torch.float32) % 2  # values must learn which completions score
    losses = [agent.learn((ids, action_mask, rewards, attention_mask))["value_loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_ppo_raises_mean_reward_and_lowers_value_loss(peaked_model_dir, tokenizer):
    agent = make_agent(peaked_model_dir, tokenizer, seed=0)
    env = ReasoningGym(DATA, DATA, tokenizer, lowercase_share, data_batch_size_per_gpu=6)
    prompts = env.reset()
    rewards, value_losses = [], []
    for _ in range(18):
        result = agent.get_action(prompts)
        batch_rewards = env.score(prompts, result)
        metrics = agent.learn((result.completion_ids, result.action_masks, batch_rewards, result.attention_mask))
        rewards.append(float(batch_rewards.mean()))
        value_losses.append(metrics["value_loss"])
        prompts = env.advance()
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.3 and last > first + 0.4, rewards
    assert sum(value_losses[-3:]) < sum(value_losses[:3]), value_losses


def test_run_checkpoint_restores_the_trained_value_head_and_its_optimizer_state(tiny_model_dir, tokenizer, tmp_path):
    """The run manager goes through the agent's checkpoint contract: the value head comes back trained, as a
    safetensors module file, with its Adam moments (it used to come back as a freshly initialised head)."""
    from agilerl_llm.checkpoint import CheckpointConfig, CheckpointManager

    agent = make_agent(tiny_model_dir, tokenizer, beta=0.05)
    agent.learn(rollout(agent, tokenizer))
    manager = CheckpointManager(CheckpointConfig(path=tmp_path / "ck"))
    manager.save(1, [agent], None)
    agent_dir = tmp_path / "ck" / "global_step_1" / "agent_0"
    saved_head = load_file(str(agent_dir / "modules" / "value_head.safetensors"))
    assert torch.equal(saved_head["linear.weight"], agent.value_head.linear.weight)
    attributes = torch.load(agent_dir / "attributes.pt", weights_only=True)
    assert "value_head_state" not in attributes["attributes"] and attributes["modules"] == {"value_head": "critic"}

    fresh = make_agent(tiny_model_dir, tokenizer, seed=11)
    assert not torch.equal(fresh.value_head.linear.weight, agent.value_head.linear.weight)
    CheckpointManager(CheckpointConfig(path=tmp_path / "ck")).restore([fresh])
    assert torch.equal(fresh.value_head.linear.weight, agent.value_head.linear.weight)
    assert torch.equal(fresh.value_head.linear.bias, agent.value_head.linear.bias)
    for expected, actual in zip(_head_moments(agent), _head_moments(fresh), strict=True):
        assert torch.equal(expected, actual)


def _head_moments(agent) -> list[torch.Tensor]:
    """The AdamW first and second moments of the value head's parameters."""
    state = agent.optimizer.state
    return [state[p][key] for p in agent.value_head.parameters() for key in ("exp_avg", "exp_avg_sq")]


def test_clone_copies_the_value_head_and_never_shares_it(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, beta=0.05)
    agent.learn(rollout(agent, tokenizer))
    clone = agent.clone(index=1)
    assert torch.equal(clone.value_head.linear.weight, agent.value_head.linear.weight)
    assert clone.value_head.linear.weight.data_ptr() != agent.value_head.linear.weight.data_ptr()
    for expected, actual in zip(_head_moments(agent), _head_moments(clone), strict=True):
        assert torch.equal(expected, actual) and expected.data_ptr() != actual.data_ptr()
    before = agent.value_head.linear.weight.detach().clone()
    clone.learn(rollout(clone, tokenizer))
    assert torch.equal(agent.value_head.linear.weight, before)
