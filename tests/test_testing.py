"""The offline tiny-model factory: sizes, tokenizer round trips, and the real from_pretrained path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm.testing import MODEL_SIZES, build_tiny_model, build_tiny_tokenizer, count_parameters, save_tiny_model


def test_sizes_span_a_tenth_to_thirty_million_parameters():
    counts = {size: count_parameters(build_tiny_model(size)) for size in ("nano", "30m")}
    assert 50_000 < counts["nano"] < 200_000
    assert 25_000_000 < counts["30m"] < 40_000_000
    assert list(MODEL_SIZES) == ["nano", "tiny", "small", "30m"]


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_saved_model_and_tokenizer_round_trip_through_from_pretrained(tmp_path, architecture):
    path = save_tiny_model(tmp_path / architecture, "nano", architecture=architecture, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = "What is 12 + 7?\nAnswer: 19 é"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left"
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}) == 3
    fresh = build_tiny_model("nano", architecture=architecture, seed=3)
    for (name, saved), (_, built) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(saved, built), name


def test_chat_template_opens_the_assistant_turn():
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>Be brief.<|eos|><|user|>2+2?<|eos|><|assistant|>"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_weights_depend_only_on_the_seed():
    a, b, c = build_tiny_model("nano", seed=1), build_tiny_model("nano", seed=1), build_tiny_model("nano", seed=2)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_bad_size_and_architecture_are_named():
    with pytest.raises(ValueError, match="size="):
        build_tiny_model("huge")
    with pytest.raises(ValueError, match="architecture="):
        build_tiny_model("nano", architecture="gpt2")
