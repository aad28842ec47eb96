"""The lean decoding loop (rollout/sampling.py) against transformers' own generate and logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from agilerl_llm.rollout.hf import shared_prompt_cache
from agilerl_llm.rollout.sampling import (
    DecodingSettings,
    decode,
    lean_decoding_unsupported_reason,
    penalise_repetition,
    sample_from,
    sampling_distribution,
)

SETTINGS = [
    DecodingSettings(8),
    DecodingSettings(8, temperature=0.7),
    DecodingSettings(8, top_k=5),
    DecodingSettings(8, top_p=0.8),
    DecodingSettings(8, temperature=1.3, top_k=12, top_p=0.9, min_p=0.05),
    DecodingSettings(8, min_p=0.2),
]


def _reference_probs(scores: torch.Tensor, settings: DecodingSettings) -> torch.Tensor:
    """transformers' warpers, in generate's order, then softmax: (N, V) probabilities in vocabulary order."""
    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    if settings.min_p:
        warpers.append(MinPLogitsWarper(settings.min_p))
    return warpers(torch.zeros(scores.shape[0], 1, dtype=torch.long), scores.clone()).softmax(dim=-1)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}")
def test_the_sampling_distribution_is_transformers_warpers(settings):
    scores = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    probs, token_of = sampling_distribution(scores, settings)
    ours = torch.zeros_like(scores).scatter(1, token_of, probs) if token_of is not None else probs
    torch.testing.assert_close(ours, _reference_probs(scores, settings), atol=1e-6, rtol=1e-5)


def test_the_exponential_race_draws_each_token_with_its_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).repeat(40_000, 1)
    token_of = torch.tensor([[4, 2, 0, 1, 3]]).repeat(40_000, 1)
    torch.manual_seed(0)
    drawn = sample_from(probs, token_of)
    frequency = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    expected = torch.tensor([0.15, 0.05, 0.3, 0.0, 0.5])  # token_of places the probabilities
    assert torch.all((frequency - expected).abs() < 0.01), frequency  # 4+ standard errors at n=40k
    assert frequency[3] == 0  # a zero-probability token is never drawn
    untruncated = sample_from(probs[:, [2, 3, 1, 4, 0]], None)  # candidates in vocabulary order
    assert torch.equal(torch.bincount(untruncated, minlength=5) > 0, expected > 0)


def test_repetition_penalty_is_the_ctrl_rule():
    scores = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert penalise_repetition(scores, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


@pytest.fixture()
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prompts(tokenizer):
    texts = ["hello there", "a", "the quick brown fox"]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("shared", [False, True], ids=["prefill", "shared-prompt-cache"])
@pytest.mark.parametrize("min_new_tokens", [0, 3])
def test_greedy_decoding_equals_generate(model, tokenizer, shared, min_new_tokens):
    """Token for token, with left padding of different lengths, eos stopping, and the eos ban of min_new_tokens."""
    ids, mask = _prompts(tokenizer)
    assert not mask.all()
    eos = [tokenizer.eos_token_id]
    repeated_ids, repeated_mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    expected = model.generate(
        input_ids=repeated_ids, attention_mask=repeated_mask, do_sample=False, max_new_tokens=10,
        min_new_tokens=min_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        temperature=None, top_p=None, top_k=None,
    )[:, ids.shape[1]:]  # fmt: skip
    cache = shared_prompt_cache(model, ids, mask, 2) if shared else None
    assert (cache is not None) == shared
    ours = decode(
        model, repeated_ids, repeated_mask, DecodingSettings(10, min_new_tokens, do_sample=False),
        eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, prompt_cache=cache,
    )  # fmt: skip
    assert torch.equal(ours, expected)


def test_greedy_repetition_penalty_matches_generate_on_an_unpadded_prompt(model, tokenizer):
    """With no padding the two agree exactly (generate also penalises the pad id of left padding; we do not)."""
    ids = tokenizer(["abcabc abc"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    expected = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, repetition_penalty=1.8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id], temperature=None, top_p=None,
        top_k=None,
    )[:, ids.shape[1]:]  # fmt: skip
    ours = decode(
        model, ids, mask, DecodingSettings(12, do_sample=False, repetition_penalty=1.8),
        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    assert torch.equal(ours, expected)


def test_seeded_sampling_repeats_and_finished_rows_are_padded(model, tokenizer):
    ids, mask = _prompts(tokenizer)
    settings = DecodingSettings(12, temperature=1.5, top_p=0.95)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(decode(model, ids, mask, settings, eos_token_ids=[5, 6, 7], pad_token_id=0))
    assert torch.equal(runs[0], runs[1])
    for row in runs[0]:
        ended = torch.isin(row, torch.tensor([5, 6, 7])).nonzero()
        if len(ended):
            assert (row[int(ended[0]) + 1 :] == 0).all()


def test_models_whose_generation_config_needs_generate_are_refused(model):
    assert lean_decoding_unsupported_reason(model) is None
    model.generation_config = GenerationConfig(no_repeat_ngram_size=2, bad_words_ids=[[3]])
    reason = lean_decoding_unsupported_reason(model)
    assert "no_repeat_ngram_size" in reason and "bad_words_ids" in reason
    assert "not a transformers PreTrainedModel" in lean_decoding_unsupported_reason(torch.nn.Linear(2, 2))
