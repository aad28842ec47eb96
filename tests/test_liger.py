"""use_liger_loss: liger-kernel's fused linear GRPO loss against our standard path (log-probs + grpo_policy_loss),
loss, metrics and every LoRA gradient, on a real tiny model. The Liger tests skip where liger-kernel is absent
(it is the optional extra ``liger``); the missing-extra error is tested everywhere."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from agilerl_llm import GRPO, LLMPPO
from agilerl_llm.algorithms.experience import Experience
from agilerl_llm.algorithms.updates import liger_micro_batch_loss, policy_gradient_step, token_normaliser
from agilerl_llm.losses import grpo_policy_loss
from agilerl_llm.utils import notices

PROMPTS = {
    "input_ids": torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]]),
    "attention_mask": torch.tensor([[1] * 4, [0, 1, 1, 1]]),
}


def make_agent(model_dir, tokenizer, **kwargs):
    settings = {"group_size": 3, "batch_size": 6, "lr": 1e-3, "max_output_tokens": 4, "beta": 0.05,
                "temperature": 0.9} | kwargs  # fmt: skip
    return GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(model_dir), gradient_checkpointing=False,
                seed=5, **settings)  # fmt: skip


def experience(agent, seed=0, per_turn=False, token_weights=False):
    """A real rollout, with old / reference log-probs moved off the current ones so ratios clip and the KL is
    non-zero, and LoRA B weights moved off zero so every adapter weight has a gradient."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in agent.actor.named_parameters():
            if "lora_B" in name and ".actor." in name:
                parameter.normal_(0, 0.05)
    result = agent.get_action(PROMPTS)
    ids, attention, mask = result.completion_ids, result.attention_mask.bool(), result.action_masks.bool()
    current = agent.get_logprobs(ids, attention, temperature=agent.temperature)
    rows = torch.randn(ids.shape[0], 1)
    advantages = rows + (torch.randn(mask.shape) if per_turn else 0.0)
    return Experience(
        completion_ids=ids,
        attention_mask=attention,
        action_mask=mask,
        rewards=torch.zeros(ids.shape[0]),
        advantages=torch.where(mask, advantages.expand(mask.shape), 0.0),
        old_logprobs=torch.where(
            mask, current + 0.3 * torch.randn(mask.shape) + 0.5 * torch.randn(ids.shape[0], 1), 0.0
        ),
        ref_logprobs=torch.where(mask, current + 0.2 * torch.randn(mask.shape), 0.0),
        token_weights=torch.where(mask, torch.rand(mask.shape) + 0.5, 0.0) if token_weights else None,
    )


def lora_gradients(agent):
    grads = {n: p.grad.clone() for n, p in agent.actor.named_parameters() if p.requires_grad and p.grad is not None}
    agent.actor.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    ("loss_type", "level", "token_weights"),
    [("grpo", "token", False), ("grpo", "token", True), ("gspo", "trajectory", False)],
    ids=["grpo-token", "grpo-token-vllm-weights", "gspo-trajectory"],
)
def test_liger_loss_and_gradients_equal_the_standard_path(tiny_model_dir, tokenizer, loss_type, level, token_weights):
    pytest.importorskip("liger_kernel")
    agent = make_agent(tiny_model_dir, tokenizer, loss_type=loss_type)
    batch = experience(agent, token_weights=token_weights)
    normaliser = token_normaliser(agent, batch)
    ratio_low, ratio_high = agent.clip_bounds
    agent.actor.zero_grad(set_to_none=True)

    logprobs = agent.get_logprobs(batch.completion_ids, batch.attention_mask, temperature=agent.temperature,
                                  requires_grad=True)  # fmt: skip
    standard = grpo_policy_loss(logprobs, batch.old_logprobs, batch.ref_logprobs, batch.advantages, batch.action_mask,
                                loss_type=loss_type, ratio_low=ratio_low, ratio_high=ratio_high, beta=agent.beta,
                                num_tokens_normalizer=normaliser, importance_sampling_level=level,
                                token_weights=batch.token_weights)  # fmt: skip
    standard.loss.backward()
    expected = lora_gradients(agent)

    loss, kl, clip_fraction = liger_micro_batch_loss(agent, batch, normaliser, loss_type=loss_type,
                                                     ratio_bounds=agent.clip_bounds, beta=agent.beta)  # fmt: skip
    loss.backward()
    ours = lora_gradients(agent)

    assert 0 < float(standard.clip_fraction) < 1 and float(standard.kl) > 0  # the test exercises clipping and KL
    torch.testing.assert_close(loss.detach(), standard.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, standard.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip_fraction, standard.clip_fraction, rtol=1e-5, atol=1e-6)
    assert expected.keys() == ours.keys() and len(expected) > 0
    worst = max(float((ours[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in expected.items())
    assert worst < 1e-4, f"largest relative gradient difference {worst:.2e}"


def test_a_liger_agent_learns_and_leaves_out_the_metrics_liger_cannot_give(tiny_model_dir, tokenizer):
    pytest.importorskip("liger_kernel")
    agent = make_agent(tiny_model_dir, tokenizer, use_liger_loss=True)
    before = {n: p.detach().clone() for n, p in agent.actor.named_parameters() if p.requires_grad}
    result = agent.get_action(PROMPTS)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    assert "entropy" not in metrics and "ratio_mean" not in metrics
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("mean_loss", "mean_kl", "clip_fraction"))
    assert any(not torch.equal(p, before[n]) for n, p in agent.actor.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("settings", "per_turn", "reason"),
    [({"loss_type": "cispo"}, False, "clamps the importance weight only from above"),
     ({}, True, "advantages differ between a row's tokens")],
    ids=["cispo", "turn-advantages"],
)  # fmt: skip
def test_settings_liger_cannot_reproduce_use_the_standard_path_and_say_so_once(
    tiny_model_dir, tokenizer, settings, per_turn, reason, monkeypatch
):
    pytest.importorskip("liger_kernel")
    monkeypatch.setattr(notices, "_warned", set())
    agent = make_agent(tiny_model_dir, tokenizer, use_liger_loss=True, **settings)
    batch = experience(agent, per_turn=per_turn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            metrics = policy_gradient_step(agent, batch, loss_type=agent.loss_type, ratio_bounds=agent.clip_bounds,
                                           beta=agent.beta, importance_sampling_level=agent.importance_sampling_level)  # fmt: skip
    assert "entropy" in metrics  # the standard path ran
    messages = [str(w.message) for w in caught if "use_liger_loss" in str(w.message)]
    assert len(messages) == 1 and reason in messages[0], messages


def test_without_liger_kernel_the_error_names_the_extra(tiny_model_dir, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"agilerl_llm\[liger\]"):
        make_agent(tiny_model_dir, tokenizer, use_liger_loss=True)


def test_ppo_policy_loss_through_liger_equals_the_standard_path(tiny_model_dir, tokenizer):
    """PPO's per-token (GAE-like) advantages through Liger's chunked PPO base with our chunk loss: loss, clip
    fraction, ratio mean and every LoRA gradient equal the fused-log-prob path, with vLLM weights."""
    pytest.importorskip("liger_kernel")
    from agilerl_llm.algorithms.updates import liger_ppo_policy_loss

    agent = make_agent(tiny_model_dir, tokenizer)
    batch = experience(agent, per_turn=True, token_weights=True)  # a different advantage on every token
    normaliser = token_normaliser(agent, batch)
    ratio_low, ratio_high = agent.clip_bounds
    agent.actor.zero_grad(set_to_none=True)
    logprobs = agent.get_logprobs(batch.completion_ids, batch.attention_mask, temperature=agent.temperature,
                                  requires_grad=True)  # fmt: skip
    standard = grpo_policy_loss(logprobs, batch.old_logprobs, None, batch.advantages, batch.action_mask,
                                loss_type="grpo", ratio_low=ratio_low, ratio_high=ratio_high, beta=0.0,
                                num_tokens_normalizer=normaliser, token_weights=batch.token_weights)  # fmt: skip
    standard.loss.backward()
    expected = lora_gradients(agent)
    liger = liger_ppo_policy_loss(agent, batch, normaliser, agent.clip_bounds)
    liger.loss.backward()
    ours = lora_gradients(agent)
    assert 0 < float(standard.clip_fraction) < 1
    for field in ("loss", "policy_loss", "clip_fraction", "ratio_mean"):
        torch.testing.assert_close(getattr(liger, field).detach(), getattr(standard, field).detach(), rtol=1e-5,
                                   atol=1e-6, msg=field)  # fmt: skip
    assert expected.keys() == ours.keys() and len(expected) > 0
    worst = max(float((ours[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in expected.items())
    assert worst < 1e-4, f"largest relative gradient difference {worst:.2e}"


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_a_ppo_update_through_liger_equals_the_standard_one(tiny_model_dir, tokenizer, gradient_checkpointing):
    """Two PPO epochs (the second off-policy, so ratios move and clip) from one rollout: same metrics."""
    pytest.importorskip("liger_kernel")

    def ppo(**kwargs):
        return LLMPPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir), seed=5, lr=5e-2,
                      batch_size=6, update_epochs=2, max_output_tokens=4, min_output_tokens=4, beta=0.05,
                      gradient_checkpointing=gradient_checkpointing, **kwargs)  # fmt: skip

    standard, liger = ppo(), ppo(use_liger_loss=True)
    result = standard.get_action(PROMPTS)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.2])
    batch = (result.completion_ids, result.action_masks, rewards, result.attention_mask)
    metrics = [agent.learn(batch) for agent in (standard, liger)]
    assert metrics[0]["clip_fraction"] > 0
    for key in ("mean_loss", "policy_loss", "value_loss", "clip_fraction", "ratio_mean", "grad_norm"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-6), key


def test_reinforce_through_liger_takes_the_same_step(tiny_model_dir, tokenizer):
    """REINFORCE's update is policy_gradient_step with one advantage per row, so it goes through Liger: two agents
    built alike, one with use_liger_loss, report the same loss and gradient norm for the same rollout."""
    pytest.importorskip("liger_kernel")
    from agilerl_llm import LLMReinforce

    def reinforce(**kwargs):
        return LLMReinforce(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir),
                            gradient_checkpointing=False, seed=5, batch_size=2, lr=1e-3, max_output_tokens=4,
                            **kwargs)  # fmt: skip

    standard, liger = reinforce(), reinforce(use_liger_loss=True)
    result = standard.get_action(PROMPTS, training=True, repeat_prompts=False)
    rollout = (result.completion_ids, result.action_masks, torch.tensor([1.0, -0.5]), result.attention_mask)
    expected, ours = standard.learn(rollout), liger.learn(rollout)
    assert "entropy" in expected and "entropy" not in ours
    for key in ("mean_loss", "grad_norm"):
        assert ours[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-7), key
    assert expected["grad_norm"] > 0
