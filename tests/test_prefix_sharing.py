"""A group's prompt encoded once (model/prefix_sharing.py): log-probs, values and LoRA gradients equal the plain
forward's on real tiny Qwen2 and Llama rollouts, a GRPO update and a DPO update are the same, the decoder really
runs twice (prefix, then remainders) where rows share a prompt and once where they do not or under activation
checkpointing, and a model whose forward ignores the cache is detected."""

from __future__ import annotations

import pytest
import torch
from helpers import move_lora_b
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from agilerl_llm import DPO, GRPO, LLMPPO
from agilerl_llm.envs.preference import PreferenceBatch
from agilerl_llm.envs.sft import SupervisedBatch
from agilerl_llm.model.prefix_sharing import prefix_sharing_unsupported_reason, shared_prefix_length

PROMPTS = {
    "input_ids": torch.tensor([[0, 0, 5, 6, 7], [0, 9, 10, 11, 12], [4, 5, 6, 7, 8]]),
    "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),
}


def test_the_shared_prefix_ends_before_the_first_action_token():
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 5:7] = True
    mask[1, 4:6] = True  # log-prob column 4 scores token 5: tokens 0..4 are prompt in every row
    assert shared_prefix_length(mask) == 5
    assert shared_prefix_length(torch.zeros(2, 4, dtype=torch.bool)) is None


def build(cls, model_dir, tokenizer, **kwargs):
    settings = {"gradient_checkpointing": False, "seed": 3, "lr": 1e-2} | kwargs
    agent = cls(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
                **settings)  # fmt: skip
    move_lora_b(agent)
    return agent


class DecoderCalls:
    """Counts the decoder's forward calls (one per plain forward; two when a prefix is shared)."""

    def __init__(self, agent):
        self.count = 0
        agent.policy_forward_module.backbone.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


def rollout(agent):
    result = agent.get_action(PROMPTS)
    return result.completion_ids, result.attention_mask, result.action_masks


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_llama_tied_dir"])
def test_shared_prefix_log_probs_and_gradients_equal_the_plain_forward(request, tokenizer, model_fixture):
    agent = build(GRPO, request.getfixturevalue(model_fixture), tokenizer, group_size=4, max_output_tokens=5)
    assert agent.shares_prefixes
    ids, attention, actions = rollout(agent)
    prefix = shared_prefix_length(actions)
    calls = DecoderCalls(agent)
    results = []
    for prefix_length in (None, prefix):
        agent.actor.zero_grad(set_to_none=True)
        logprobs = agent.get_logprobs(ids, attention, requires_grad=True, prefix_length=prefix_length)
        (logprobs * actions).sum().backward()
        grads = {n: p.grad.clone() for n, p in agent.actor.named_parameters() if p.grad is not None}
        results.append((logprobs.detach(), grads))
    assert calls.count == 3  # plain: one decoder call; shared: the prompts, then the completions
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared[actions], plain[actions], atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    worst = max(
        float((shared_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in plain_grads.items()
    )
    assert worst < 1e-4, f"largest relative gradient difference {worst:.2e}"
    no_grad = agent.get_logprobs(ids, attention, prefix_length=prefix)  # the micro-batched scoring forward
    torch.testing.assert_close(no_grad[actions], plain[actions], atol=1e-5, rtol=1e-5)


def test_rows_with_distinct_prompts_and_checkpointed_layers_run_the_plain_forward(tiny_model_dir, tokenizer):
    agent = build(GRPO, tiny_model_dir, tokenizer, group_size=2, max_output_tokens=4)
    ids, attention, actions = (tensor[::2] for tensor in rollout(agent))  # one completion per prompt: no sharing
    calls = DecoderCalls(agent)
    agent.get_logprobs(ids, attention, prefix_length=shared_prefix_length(actions))
    assert calls.count == 1
    checkpointed = build(
        GRPO, tiny_model_dir, tokenizer, group_size=3, max_output_tokens=4, gradient_checkpointing=True
    )
    ids, attention, actions = rollout(checkpointed)
    calls = DecoderCalls(checkpointed)
    checkpointed.set_training_mode(True)
    with_grad = checkpointed.get_logprobs(
        ids, attention, requires_grad=True, prefix_length=shared_prefix_length(actions)
    )
    assert calls.count == 1  # transformers would drop the prefix cache inside checkpointed layers
    without = checkpointed.get_logprobs(ids, attention, prefix_length=shared_prefix_length(actions))
    assert calls.count == 3  # no grad: the cache survives, so the prefix is shared
    torch.testing.assert_close(without[actions], with_grad.detach()[actions], atol=1e-5, rtol=1e-5)


def test_ppo_values_and_update_are_the_same_with_a_shared_prefix(tiny_model_dir, tokenizer):
    metrics = []
    for sharing in (False, True):
        agent = build(LLMPPO, tiny_model_dir, tokenizer, group_size=3, max_output_tokens=4, min_output_tokens=4,
                      batch_size=9, update_epochs=2, beta=0.05)  # fmt: skip
        agent.policy_forward_module.prefix_sharing = sharing
        torch.manual_seed(0)
        ids, attention, actions = rollout(agent)
        rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.2, 0.3, 0.9, 0.1])
        metrics.append(agent.learn((ids, actions, rewards, attention)))
    for key in ("mean_loss", "policy_loss", "value_loss", "value_mean", "grad_norm", "mean_kl"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-6), key


def test_a_grpo_update_is_the_same_with_a_shared_prefix(tiny_model_dir, tokenizer):
    metrics = []
    for sharing in (False, True):
        agent = build(GRPO, tiny_model_dir, tokenizer, group_size=4, max_output_tokens=4, batch_size=12, beta=0.05,
                      update_epochs=2)  # fmt: skip
        agent.policy_forward_module.prefix_sharing = sharing
        torch.manual_seed(0)
        ids, attention, actions = rollout(agent)
        rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [1.0, 0.2, 0.3, 0.9], [0.1, 0.0, 0.0, 1.0]])
        metrics.append(agent.learn((ids, actions, rewards, attention)))
    for key in ("mean_loss", "mean_kl", "grad_norm", "clip_fraction", "entropy"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-6), key


def test_a_dpo_pair_shares_its_prompt(tiny_model_dir, tokenizer):
    def rows(tail):
        ids = torch.tensor([[5, 6, 7, 8, *tail], [9, 10, 11, 12, *tail[::-1]]])
        loss_mask = torch.zeros(2, ids.shape[1] - 1, dtype=torch.bool)
        loss_mask[:, 3:] = True  # tokens 4.. are the answer
        return SupervisedBatch(ids, torch.ones_like(ids, dtype=torch.bool), loss_mask)

    pairs = PreferenceBatch(rows([20, 21, 22]), rows([23, 24, 25]))
    metrics = []
    for sharing in (False, True):
        agent = build(DPO, tiny_model_dir, tokenizer, batch_size=2, use_separate_reference_adapter=True)
        agent.policy_forward_module.prefix_sharing = sharing
        calls = DecoderCalls(agent)
        metrics.append(agent.learn(pairs))
        # the reference pass scores one pair per micro-batch (2 calls plain, 4 shared), then one training pass
        assert calls.count == (6 if sharing else 3), (sharing, calls.count)
    for key in ("loss/dpo", "rewards/margin", "logps/chosen", "grad_norm"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-5, abs=1e-6), key


class _CacheBlindQwen2(Qwen2Model):
    """A decoder that ignores a cache it is given (as a model without cache support would)."""

    def forward(self, *args, cache=None, past_key_values=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_ignores_the_cache_is_detected(tiny_model_dir, tokenizer):
    network = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    network.model.__class__ = _CacheBlindQwen2
    assert "differ from the plain forward" in prefix_sharing_unsupported_reason(network.model)
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=network, gradient_checkpointing=False)
    assert not agent.shares_prefixes and not agent.policy_forward_module.prefix_sharing
    assert agent.clone().policy_forward_module.prefix_sharing is False
