"""The adapter set's own switching (cached layer lists instead of PEFT's whole-model walks) and the merged
weights it samples with: each gives what PEFT's own path gives, on a real tiny model."""

from __future__ import annotations

import torch
from helpers import move_lora_b
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM

from agilerl_llm import GRPO
from agilerl_llm.model.adapters import ACTOR, REFERENCE
from agilerl_llm.rollout.base import SamplingSettings
from agilerl_llm.rollout.hf import generate_completions

IDS = torch.tensor([[0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8]])
MASK = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def agent_with_moved_adapters(model_dir, tokenizer):
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
                 gradient_checkpointing=False, max_output_tokens=6)  # fmt: skip
    move_lora_b(agent, std=0.1, adapter=ACTOR, seed=0)
    return agent


def logits(agent):
    with torch.no_grad():
        return agent.actor(input_ids=IDS, attention_mask=MASK).logits


def test_switching_and_disabling_give_what_peft_gives(tiny_model_dir, tokenizer):
    agent = agent_with_moved_adapters(tiny_model_dir, tokenizer)
    actor = logits(agent)
    agent.adapters.activate(REFERENCE)
    reference = logits(agent)
    agent.adapters.activate(ACTOR)
    with agent.adapters.disabled():
        bare = logits(agent)
        with agent.adapters.disabled():  # nested: still disabled after the inner block
            pass
        torch.testing.assert_close(logits(agent), bare)
    torch.testing.assert_close(logits(agent), actor)  # enabled again
    assert not torch.allclose(actor, reference, atol=1e-4)
    # PEFT's own calls on the same model agree
    agent.actor.base_model.set_adapter(REFERENCE)
    torch.testing.assert_close(logits(agent), reference)
    with agent.actor.disable_adapter():
        torch.testing.assert_close(logits(agent), bare)
    agent.actor.base_model.set_adapter(ACTOR)
    agent.adapters.activate(REFERENCE)
    agent.adapters.activate(ACTOR)
    trainable = {n for n, p in agent.actor.named_parameters() if p.requires_grad}
    assert trainable and all(f".{ACTOR}." in n for n in trainable)


def test_merged_sampling_weights_give_the_same_outputs_and_leave_the_base_alone(tiny_model_dir, tokenizer):
    agent = agent_with_moved_adapters(tiny_model_dir, tokenizer)
    base = {n: p.detach().clone() for n, p in agent.actor.named_parameters() if "lora_" not in n}
    unmerged = logits(agent)
    layers = [m for m in agent.actor.modules() if isinstance(m, LoraLinear)]
    with agent.adapters.merged_for_sampling():
        assert all("forward" in layer.__dict__ for layer in layers)
        merged = logits(agent)
    assert not any("forward" in layer.__dict__ for layer in layers)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, base[n]) for n, p in agent.actor.named_parameters() if "lora_" not in n)
    with agent.adapters.merged_for_sampling(budget_bytes=0):  # over budget: nothing merged
        assert not any("forward" in layer.__dict__ for layer in layers)


def test_greedy_generation_is_the_same_merged(tiny_model_dir, tokenizer):
    agent = agent_with_moved_adapters(tiny_model_dir, tokenizer)
    settings = SamplingSettings(max_output_tokens=6)
    kwargs = {"num_completions": 2, "sampling": settings, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_ids": [tokenizer.eos_token_id]}  # fmt: skip
    plain = generate_completions(agent.actor, IDS, MASK, **kwargs)
    with agent.adapters.merged_for_sampling():
        merged = generate_completions(agent.actor, IDS, MASK, **kwargs)
    assert torch.equal(plain.completion_ids, merged.completion_ids)


def reference_storages(agent):
    return [p.data_ptr() for p in agent.adapters.parameters(REFERENCE)]


def test_clones_share_the_reference_until_it_moves(tiny_model_dir, tokenizer, tmp_path):
    agent = agent_with_moved_adapters(tiny_model_dir, tokenizer)
    reference = {k: v.clone() for k, v in agent.adapters.state_dict(REFERENCE).items()}
    clone, other = agent.clone(), agent.clone()
    assert reference_storages(clone) == reference_storages(agent) == reference_storages(other)  # one copy
    assert all(not p.requires_grad for p in clone.adapters.parameters(REFERENCE))
    # a member's reference moves: it alone gets new storage and values; the others keep theirs
    clone.set_reference_policy(1)
    assert reference_storages(clone) != reference_storages(agent)
    for key, value in clone.adapters.state_dict(REFERENCE).items():
        torch.testing.assert_close(value, clone.adapters.state_dict(ACTOR)[key])
    for member in (agent, other):
        assert all(torch.equal(member.adapters.state_dict(REFERENCE)[k], v) for k, v in reference.items())
    assert reference_storages(agent) == reference_storages(other)
    # a checkpoint with another reference loads into a sharing member without touching the others
    clone.save_checkpoint(str(tmp_path / "moved"))
    other.load_checkpoint(str(tmp_path / "moved"), overwrite_reference_adapter=True)
    assert reference_storages(other) != reference_storages(agent)
    assert all(torch.equal(agent.adapters.state_dict(REFERENCE)[k], v) for k, v in reference.items())
    for key, value in clone.adapters.state_dict(REFERENCE).items():
        torch.testing.assert_close(other.adapters.state_dict(REFERENCE)[key], value)
    # the same through a full-state checkpoint (written in place into the model's tensors)
    third = agent.clone()
    clone.save_checkpoint(str(tmp_path / "full"), lora_only=False)
    third.load_checkpoint(str(tmp_path / "full"), overwrite_reference_adapter=True)
    assert reference_storages(third) != reference_storages(agent)
    assert all(torch.equal(agent.adapters.state_dict(REFERENCE)[k], v) for k, v in reference.items())
    for key, value in clone.adapters.state_dict(REFERENCE).items():
        torch.testing.assert_close(third.adapters.state_dict(REFERENCE)[key], value)
