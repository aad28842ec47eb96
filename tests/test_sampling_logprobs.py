"""The sampling distribution's log-probs (temperature, min-p, top-k, top-p) and the rollout/trainer mismatch
correction that uses them. No vLLM needed: tests/test_vllm.py compares these with real vLLM."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from agilerl_llm import GRPO, LLMPPO, LLMReinforce
from agilerl_llm.algorithms.experience import Experience, place_on_action_tokens
from agilerl_llm.algorithms.updates import with_mismatch_weights
from agilerl_llm.model.logprobs import naive_logprobs
from agilerl_llm.model.sampling_logprobs import mask_sampling_logits, processed_logprobs


def reference_mask(logits: torch.Tensor, top_k: int | None, top_p: float, min_p: float) -> torch.Tensor:
    """Row by row, token by token, in plain Python."""
    out = logits.clone()
    for row in range(logits.shape[0]):
        values = logits[row].tolist()
        keep = [True] * len(values)
        if min_p > 0:
            top = max(math.exp(v) for v in values)
            keep = [math.exp(v) >= min_p * top for v in values]
        if top_k:
            kth = sorted((v for v, k in zip(values, keep, strict=True) if k), reverse=True)[:top_k][-1]
            keep = [k and v >= kth for v, k in zip(values, keep, strict=True)]
        if top_p < 1.0:
            kept = [(v, i) for i, (v, k) in enumerate(zip(values, keep, strict=True)) if k]
            total = sum(math.exp(v) for v, _ in kept)
            ascending = sorted(kept)
            cumulative = 0.0
            for position, (v, i) in enumerate(ascending):
                cumulative += math.exp(v) / total
                if cumulative <= 1.0 - top_p and position < len(ascending) - 1:
                    keep[i] = False
        for i, k in enumerate(keep):
            if not k:
                out[row, i] = float("-inf")
    return out


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"), [(None, 1.0, 0.0), (5, 1.0, 0.0), (None, 0.8, 0.0), (7, 0.9, 0.0), (0, 1.0, 0.1)]
)
def test_mask_matches_the_slow_reference(top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 23, dtype=torch.float64) * 2
    if top_p == 1.0:  # (under top-p, which of two tied tokens goes first is the sort's choice, in vLLM too)
        logits[0, :4] = 1.5  # ties at the top-k boundary are kept
    expected = reference_mask(logits, top_k, top_p, min_p)
    got = mask_sampling_logits(logits, top_k=top_k, top_p=top_p, min_p=min_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_mask_agrees_with_huggingface_generate_warpers():
    """HF ``generate`` samples from this distribution (temperature, top-k, top-p, min-p in that order of effect)."""
    torch.manual_seed(1)
    logits = torch.randn(8, 50)
    warped = TemperatureLogitsWarper(0.7)(None, logits.clone())
    expected = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(12)(None, warped.clone()))
    got = mask_sampling_logits(logits / 0.7, top_k=12, top_p=0.9)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    min_p_expected = MinPLogitsWarper(0.2)(None, warped.clone())
    assert torch.equal(torch.isinf(mask_sampling_logits(logits / 0.7, min_p=0.2)), torch.isinf(min_p_expected))


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_processed_logprobs_is_the_renormalised_masked_log_softmax(chunk_rows):
    torch.manual_seed(2)
    hidden, weight = torch.randn(2, 5, 16), torch.randn(40, 16)
    bias = torch.randn(40)
    targets = torch.randint(0, 40, (2, 5))
    got = processed_logprobs(
        hidden, weight, targets, temperature=0.8, top_k=10, top_p=0.85, bias=bias, chunk_rows=chunk_rows
    )
    logits = (hidden @ weight.T + bias).reshape(-1, 40) / 0.8
    expected = reference_mask(logits.double(), 10, 0.85, 0.0).log_softmax(-1).gather(-1, targets.reshape(-1, 1))
    finite = torch.isfinite(expected.flatten())
    assert torch.equal(torch.isfinite(got.flatten()), finite)
    assert torch.allclose(got.flatten()[finite].double(), expected.flatten()[finite], atol=1e-5)
    # no filter: exactly the tempered log-softmax the training forward uses
    plain = processed_logprobs(hidden, weight, targets, temperature=0.8, top_k=None, top_p=1.0, bias=bias)
    assert torch.allclose(plain, naive_logprobs(hidden, weight, targets, bias=bias, temperature=0.8), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        processed_logprobs(hidden, weight, targets, temperature=0.0)


def test_place_on_action_tokens_checks_lengths():
    mask = torch.tensor([[False, True, True], [False, False, True]])
    placed, given = place_on_action_tokens([torch.tensor([-1.0, -2.0]), None], mask)
    assert placed.tolist() == [[0.0, -1.0, -2.0], [0.0, 0.0, 0.0]] and given.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"sampling_logps\[1\] has 2 values"):
        place_on_action_tokens([torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0])], mask)
    with pytest.raises(ValueError, match="sampling_logps has 1 rows"):
        place_on_action_tokens([None], mask)


def rollout_agent(cls, tiny_model_dir, tokenizer, **overrides):
    settings = {
        "model_name": str(tiny_model_dir),
        "group_size": 4,
        "batch_size": 8,
        "lr": 1e-2,
        "beta": 0.0,
        "max_grad_norm": None,  # the gradient norm is compared unclipped
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
        "max_output_tokens": 6,
        "gradient_checkpointing": False,
        "vllm_importance_sampling_cap": 2.0,
    }
    if cls is not GRPO:
        settings.pop("group_size")
        settings["batch_size"] = 8
    return cls(tokenizer.pad_token_id, tokenizer.pad_token, **(settings | overrides))


def sampled_batch(agent, tokenizer):
    encoded = tokenizer(["abc", "hello"], return_tensors="pt", padding=True)
    obs = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    result = agent.get_action(obs, training=True, repeat_prompts=not isinstance(agent, (LLMPPO, LLMReinforce)))
    rows = result.completion_ids.shape[0]
    rewards = torch.linspace(-1.0, 1.0, rows)
    return result, rewards


def trainer_sampling_logps(agent, result) -> list[torch.Tensor]:
    trainer = agent.get_logprobs(result.completion_ids, result.attention_mask, sampling=agent.sampling_settings())
    return [trainer[row, result.action_masks[row]] for row in range(result.completion_ids.shape[0])]


def test_correction_weights_are_the_capped_ratio_of_processed_logprobs(tiny_model_dir, tokenizer):
    agent = rollout_agent(GRPO, tiny_model_dir, tokenizer)
    result, rewards = sampled_batch(agent, tokenizer)
    batch = Experience.from_input((result.completion_ids, result.action_masks, rewards), agent.pad_token_id, "cpu")
    torch.manual_seed(3)
    trainer = trainer_sampling_logps(agent, result)
    sampling = [row + torch.randn(row.shape) for row in trainer]
    sampling[1] = None  # a row the engine gave no log-probs for keeps weight 1
    weights = with_mismatch_weights(agent, batch, sampling).token_weights
    for row in range(batch.num_rows):
        positions = batch.action_mask[row].nonzero().squeeze(-1).tolist()
        for k, position in enumerate(positions):
            expected = 1.0 if sampling[row] is None else min(math.exp(trainer[row][k] - sampling[row][k]), 2.0)
            assert weights[row, position].item() == pytest.approx(expected, rel=1e-5)
        assert weights[row][~batch.action_mask[row]].abs().sum() == 0
    agent.vllm_importance_sampling_correction = False
    assert with_mismatch_weights(agent, batch, sampling).token_weights is None


@pytest.mark.parametrize("cls", [GRPO, LLMReinforce, LLMPPO])
def test_correction_weights_scale_the_policy_gradient(cls, tiny_model_dir, tokenizer):
    """Weights of 1/2 everywhere halve the policy gradient; weights capped at 2 double it."""
    base = rollout_agent(cls, tiny_model_dir, tokenizer, **({"vf_coef": 0.0} if cls is LLMPPO else {}))
    result, rewards = sampled_batch(base, tokenizer)
    trainer = trainer_sampling_logps(base, result)
    experience = (result.completion_ids, result.action_masks, rewards, result.attention_mask)
    norms = {}
    for name, shift in (("same", 0.0), ("half", math.log(2.0)), ("capped", -5.0)):
        agent = base.clone()
        metrics = agent.learn(experience, sampling_logps=[row + shift for row in trainer])
        norms[name] = metrics["grad_norm"]
        expected_weight = {"same": 1.0, "half": 0.5, "capped": 2.0}[name]
        assert metrics["is_weight_mean"] == pytest.approx(expected_weight, rel=1e-4)
    assert norms["same"] > 0
    assert norms["half"] == pytest.approx(norms["same"] / 2, rel=1e-4)
    assert norms["capped"] == pytest.approx(norms["same"] * 2, rel=1e-4)
