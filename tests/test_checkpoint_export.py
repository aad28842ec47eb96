"""Merged HuggingFace export: loadable by from_pretrained, same log-probs as the agent, the live agent untouched."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_grpo
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm.checkpoint import CheckpointError
from agilerl_llm.checkpoint.export import export_checkpoint, export_policy
from agilerl_llm.testing import save_tiny_model

TEXTS = ["1+2=3", "10+20=30 and more", "<|user|>7*6=<|eos|><|assistant|>42"]


def make_agent(model_dir, tokenizer, gradient_checkpointing=False):
    return tiny_grpo(model_dir, tokenizer, gradient_checkpointing=gradient_checkpointing)


@torch.no_grad()
def perturb(agent, adapter="actor", scale=0.3, seed=0):
    """Give the adapter non-zero LoRA B weights, so merging it really changes the model."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in agent.actor.named_parameters():
        if "lora_B" in name and f".{adapter}." in name:
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def batch(tokenizer):
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")  # left padding
    return encoded["input_ids"], encoded["attention_mask"]


@torch.no_grad()
def hf_logprobs(model, input_ids, attention_mask):
    """Per-token log-probs of each next token with a plain HuggingFace forward: (B, S) -> (B, S-1)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each row's text
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def target_mask(attention_mask):
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()


def snapshot(agent):
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in agent.actor.named_parameters()}


def test_export_policy_matches_agent_logprobs_and_leaves_agent_untouched(tmp_path, tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, gradient_checkpointing=True)
    perturb(agent, "actor", seed=0)
    perturb(agent, "reference", seed=1)  # a different reference: the export must pick the actor
    input_ids, attention_mask = batch(tokenizer)
    before_params = snapshot(agent)
    before_logprobs = agent.get_logprobs(input_ids, attention_mask)
    before_reference = agent.get_logprobs(input_ids, attention_mask, policy="reference")

    out = export_policy(agent, tmp_path / "export", tokenizer)

    assert out == tmp_path / "export"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left behind
    assert not any("lora" in key for key in load_file(str(out / "model.safetensors")))
    # The live agent is unchanged: same tensors (storage) and values, same active adapter, same log-probs.
    after_params = snapshot(agent)
    assert after_params.keys() == before_params.keys()
    for name, (pointer, value) in before_params.items():
        assert after_params[name][0] == pointer, name
        assert torch.equal(after_params[name][1], value), name
    assert agent.adapters.active == "actor" and agent.actor.active_adapter == "actor"
    assert torch.equal(agent.get_logprobs(input_ids, attention_mask), before_logprobs)
    assert torch.equal(agent.get_logprobs(input_ids, attention_mask, policy="reference"), before_reference)

    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not getattr(exported, "is_activation_checkpointing", False)
    mask = target_mask(attention_mask)
    expected = before_logprobs[mask]
    actual = hf_logprobs(exported, input_ids, attention_mask)[mask]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    base = hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), input_ids, attention_mask)[mask]
    assert (base - expected).abs().max() > 1e-2  # the adapter was not trivial
    assert AutoTokenizer.from_pretrained(out)(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]


def test_export_after_training_steps(tmp_path, tiny_model_dir, tokenizer):
    from agilerl_llm.envs.reasoning import ReasoningGym
    from agilerl_llm.training.logging import MetricsLogger
    from agilerl_llm.training.reasoning import finetune_llm_reasoning

    data = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 50, 10) for b in range(3)]
    reward = lambda completion, answer, prompt: sum(map(ord, completion)) % 7 / 7  # noqa: E731
    env = ReasoningGym(data[:10], data[10:], tokenizer, reward, data_batch_size_per_gpu=2, seed=5)
    agent = make_agent(tiny_model_dir, tokenizer)
    agent.lr = 5e-2
    (agent,), _ = finetune_llm_reasoning(
        [agent], env, max_steps=2, evaluate_at_start=False, logger=MetricsLogger(print_every=0), progress=False
    )
    assert any(p.abs().sum() > 0 for n, p in agent.actor.named_parameters() if "lora_B" in n and ".actor." in n)
    input_ids, attention_mask = batch(tokenizer)
    expected = agent.get_logprobs(input_ids, attention_mask)
    exported = AutoModelForCausalLM.from_pretrained(export_policy(agent, tmp_path / "trained"))
    mask = target_mask(attention_mask)
    torch.testing.assert_close(
        hf_logprobs(exported, input_ids, attention_mask)[mask], expected[mask], atol=1e-5, rtol=0
    )


def test_export_replaces_an_earlier_export_but_never_a_user_folder(tmp_path, tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    out = tmp_path / "export"
    export_policy(agent, out)
    (out / "stale.txt").write_text("from the first export")
    perturb(agent)
    export_policy(agent, out)
    assert not (out / "stale.txt").exists()  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        export_policy(agent, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    export_policy(agent, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="adapter_name='critic'"):
        export_policy(agent, tmp_path / "critic", adapter="critic")


def test_export_checkpoint_matches_export_policy(tmp_path, tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    perturb(agent)
    agent.save_checkpoint(str(tmp_path / "agent"), lora_only=True, save_optimizer=False)
    export_policy(agent, tmp_path / "live")
    out = export_checkpoint(tmp_path / "agent", tmp_path / "from_ckpt", base_model=tiny_model_dir)
    assert (out / "tokenizer.json").is_file()  # taken from the base model's folder
    live, offline = load_file(str(tmp_path / "live" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert live.keys() == offline.keys()
    for key, tensor in live.items():
        torch.testing.assert_close(offline[key], tensor, atol=1e-6, rtol=0, msg=key)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64


def test_export_checkpoint_errors(tmp_path, tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    agent.save_checkpoint(str(tmp_path / "agent"), lora_only=True, save_optimizer=False)
    with pytest.raises(FileNotFoundError, match="critic"):
        export_checkpoint(tmp_path / "agent", tmp_path / "out", base_model=tiny_model_dir, adapter="critic")
    with pytest.raises(FileNotFoundError, match="No agent checkpoint"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "out", base_model=tiny_model_dir)

    other_base = save_tiny_model(tmp_path / "bigger", "tiny")  # hidden size 128 instead of 64
    with pytest.raises(CheckpointError) as error:
        export_checkpoint(tmp_path / "agent", tmp_path / "out", base_model=other_base)
    message = str(error.value)
    assert "module 'model.layers.0." in message and "in the base model" in message and "trained for (" in message
    assert "base model the run trained on" in message

    agent.save_checkpoint(str(tmp_path / "full"), lora_only=False, save_optimizer=False)
    with pytest.raises(CheckpointError, match="lora_only=False.*not supported"):
        export_checkpoint(tmp_path / "full", tmp_path / "out", base_model=tiny_model_dir)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()


def test_export_checkpoint_refuses_a_same_shaped_other_base(tmp_path, tiny_model_dir, tokenizer, tmp_path_factory):
    twin = save_tiny_model(tmp_path_factory.mktemp("twin"), "nano", architecture="qwen2", seed=9)
    agent = make_agent(tiny_model_dir, tokenizer)
    perturb(agent)
    agent.save_checkpoint(tmp_path / "agent", save_optimizer=False)
    with pytest.raises(CheckpointError, match="trained on another base model.*base weights differ"):
        export_checkpoint(tmp_path / "agent", tmp_path / "out", base_model=twin)
    assert not (tmp_path / "out").exists()
    export_checkpoint(tmp_path / "agent", tmp_path / "out", base_model=tiny_model_dir)
