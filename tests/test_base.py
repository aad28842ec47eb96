"""LLMAlgorithm: named adapters on one frozen base, trainable set, reference policy, cloning, errors."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.model.logprobs import naive_logprobs
from agilerl_llm.optim import CosineLRScheduleConfig
from agilerl_llm.utils import notices


def make_agent(model, tokenizer, **kwargs) -> LLMAlgorithm:
    kwargs.setdefault("lr", 1e-2)
    kwargs.setdefault("gradient_checkpointing", False)
    return LLMAlgorithm(
        pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, actor_network=model, **kwargs
    )


@pytest.fixture()
def batch(tokenizer):
    return tokenizer(["The cat sat.", "hi", "a longer line of text"], padding=True, return_tensors="pt")


def train_one_step(agent: LLMAlgorithm, batch) -> None:
    """Maximise the likelihood of the batch's real tokens for one optimizer step."""
    agent.set_training_mode(True)
    logprobs = agent.get_logprobs(batch.input_ids, batch.attention_mask, requires_grad=True)
    mask = batch.attention_mask[:, 1:].float()
    agent._backward(-(logprobs * mask).sum() / mask.sum())
    agent._optimizer_step()


def snapshot(agent: LLMAlgorithm) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in agent.actor.named_parameters()}


def test_adapters_have_the_right_names_on_one_base(tiny_model_dir, tiny_model, tokenizer):
    base_parameter_count = len(list(tiny_model.parameters()))
    agent = make_agent(tiny_model, tokenizer)
    assert set(agent.actor.peft_config) == {"actor", "reference"}
    assert agent.adapter_names() == ("actor", "reference")
    without_reference = make_agent(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, use_separate_reference_adapter=False
    )
    assert set(without_reference.actor.peft_config) == {"actor"}
    # Exactly one copy of each base weight: every LoRA layer wraps the same base linear.
    base_names = [n for n, _ in agent.actor.named_parameters() if "lora_" not in n]
    assert len(base_names) == base_parameter_count


def test_only_actor_lora_weights_are_trainable_and_change(tiny_model, tokenizer, batch):
    agent = make_agent(tiny_model, tokenizer)
    optimised = {id(p) for group in agent.optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in agent.actor.named_parameters()}
    assert optimised and all(".actor." in names[i] for i in optimised)
    assert len(optimised) == sum(1 for n in names.values() if ".actor." in n)

    before = snapshot(agent)
    train_one_step(agent, batch)
    after = snapshot(agent)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the optimizer step changed nothing"
    assert all(".actor." in n for n in changed)
    assert any("lora_A.actor" in n for n in changed) or any("lora_B.actor" in n for n in changed)
    for name in before:
        if ".actor." not in name:
            assert torch.equal(before[name], after[name]), f"{name} moved but is frozen"


def test_reference_logprobs_stay_while_actor_moves_until_set_reference_policy(tiny_model, tokenizer, batch):
    agent = make_agent(tiny_model, tokenizer)
    actor_0 = agent.get_logprobs(batch.input_ids, batch.attention_mask)
    reference_0 = agent.get_logprobs(batch.input_ids, batch.attention_mask, policy="reference")
    assert torch.equal(actor_0, reference_0)  # the reference starts as a copy of the actor

    for _ in range(2):
        train_one_step(agent, batch)
    actor_1 = agent.get_logprobs(batch.input_ids, batch.attention_mask)
    reference_1 = agent.get_logprobs(batch.input_ids, batch.attention_mask, policy="reference")
    assert torch.equal(reference_0, reference_1)
    assert (actor_1 - actor_0).abs().max() > 1e-3

    agent.set_reference_policy(1)
    reference_2 = agent.get_logprobs(batch.input_ids, batch.attention_mask, policy="reference")
    assert torch.equal(reference_2, actor_1)
    train_one_step(agent, batch)
    agent.set_reference_policy(1)  # the tracker has not advanced: no copy
    assert torch.equal(agent.get_logprobs(batch.input_ids, batch.attention_mask, policy="reference"), reference_2)


def test_without_reference_adapter_the_base_is_the_reference(tiny_model_dir, tokenizer, batch, monkeypatch):
    monkeypatch.setattr(notices, "_warned", set())  # the notice is once per process: earlier tests may have had it
    agent = make_agent(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, use_separate_reference_adapter=False
    )
    base = agent.get_logprobs(batch.input_ids, batch.attention_mask, policy="base")
    train_one_step(agent, batch)
    assert torch.equal(agent.get_logprobs(batch.input_ids, batch.attention_mask, policy="reference"), base)
    with pytest.warns(UserWarning, match="no effect") as caught:
        agent.set_reference_policy(1)
    assert caught[0].filename == __file__  # it points at the caller's line, not at the package


def test_logprobs_match_the_full_model_forward(tiny_model_dir, tokenizer, batch):
    """The fused path (hidden states + lm_head) equals log_softmax of the HF model's own logits."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    agent = make_agent(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, fused_logprobs_chunk_rows=3)
    train_one_step(agent, batch)  # make the adapter non-trivial
    ours = agent.get_logprobs(batch.input_ids, batch.attention_mask, temperature=0.7)
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = agent.actor(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
        ).logits
        expected = torch.log_softmax(logits[:, :-1].float() / 0.7, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
        with agent.adapters.disabled():
            base_logits = agent.actor(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
            ).logits
        plain_logits = plain(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
        ).logits
    mask = batch.attention_mask[:, 1:].bool()
    torch.testing.assert_close(ours[mask], expected[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base_logits, plain_logits)  # disabling adapters recovers the base model


def test_tied_embedding_model_trains_through_the_fused_op(tiny_llama_tied_dir, tokenizer, batch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_tied_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    agent = make_agent(model, tokenizer)
    hidden = agent.policy_forward(batch.input_ids, batch.attention_mask)
    weight, _ = agent.policy_forward_module.output_head()
    expected = naive_logprobs(hidden[:, :-1], weight, batch.input_ids[:, 1:])
    torch.testing.assert_close(agent.get_logprobs(batch.input_ids, batch.attention_mask), expected.detach())
    train_one_step(agent, batch)


def test_clone_is_deep_but_shares_the_frozen_base(tiny_model, tokenizer, batch):
    agent = make_agent(tiny_model, tokenizer, cosine_lr_schedule_config=CosineLRScheduleConfig(num_epochs=10))
    train_one_step(agent, batch)
    clone = agent.clone(index=5)
    assert clone.index == 5 and agent.index == 0
    torch.testing.assert_close(
        clone.get_logprobs(batch.input_ids, batch.attention_mask),
        agent.get_logprobs(batch.input_ids, batch.attention_mask),
        rtol=0,
        atol=0,
    )
    # Optimizer and schedule state are equal but not shared.
    original_state, cloned_state = agent.optimizer.state_dict(), clone.optimizer.state_dict()
    for key, state in original_state["state"].items():
        assert torch.equal(state["exp_avg"], cloned_state["state"][key]["exp_avg"])
    first = next(iter(agent.optimizer.state.values()))["exp_avg"]
    assert first.data_ptr() != next(iter(clone.optimizer.state.values()))["exp_avg"].data_ptr()
    assert clone.lr_scheduler.state_dict()["last_epoch"] == agent.lr_scheduler.state_dict()["last_epoch"] == 1

    agent_params, clone_params = dict(agent.actor.named_parameters()), dict(clone.actor.named_parameters())
    for name, parameter in agent_params.items():
        same_storage = parameter.data_ptr() == clone_params[name].data_ptr()
        # the frozen base is shared, and the frozen reference adapter until it moves (copy-on-write)
        assert same_storage == ("lora_" not in name or ".reference." in name), name

    before = snapshot(agent)
    train_one_step(clone, batch)
    clone.set_reference_policy(1)
    after = snapshot(agent)
    assert all(torch.equal(before[n], after[n]) for n in before), "training the clone changed the original"
    moved = dict(clone.actor.named_parameters())
    assert all(p.data_ptr() != moved[n].data_ptr() for n, p in agent_params.items() if ".reference." in n)
    assert not torch.equal(
        clone.get_logprobs(batch.input_ids, batch.attention_mask),
        agent.get_logprobs(batch.input_ids, batch.attention_mask),
    )


def test_peft_model_input_becomes_the_actor(tiny_model_dir, tokenizer, batch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    expected = peft_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
    ).logits
    agent = make_agent(peft_model, tokenizer)
    assert isinstance(agent.actor, PeftModel) and set(agent.actor.peft_config) == {"actor", "reference"}
    assert agent.lora_config.r == 4
    expected = torch.log_softmax(expected[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0].detach()
    mask = batch.attention_mask[:, 1:].bool()
    torch.testing.assert_close(
        agent.get_logprobs(batch.input_ids, batch.attention_mask)[mask], expected[mask], atol=1e-5, rtol=1e-5
    )


def test_model_name_loads_through_from_pretrained(tiny_model_dir, tokenizer):
    agent = LLMAlgorithm(
        pad_token_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        model_name=str(tiny_model_dir),
        model_config={"dtype": torch.float32},
    )
    assert agent.adapters.active == "actor"


def test_select_adapter_restores_the_actor(tiny_model, tokenizer):
    agent = make_agent(tiny_model, tokenizer)
    with agent.select_adapter("reference"):
        assert agent.adapters.active == "reference"
        assert all(not p.requires_grad for p in agent.adapters.parameters("reference"))
        assert all(p.requires_grad for p in agent.adapters.parameters("actor"))
    assert agent.adapters.active == "actor"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 8, "micro_batch_size_per_gpu": 3}, "micro_batch_size_per_gpu"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"lora_config": LoraConfig(r=4, target_modules=["no_such_layer"])}, "lora_config.target_modules"),
        ({"lora_config": LoraConfig(r=4, target_modules=["lm_head"])}, "lora_config.target_modules"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tiny_model, tokenizer, kwargs, argument):
    with pytest.raises(ValueError, match=argument.replace(".", r"\.")):
        make_agent(tiny_model, tokenizer, **kwargs)


def test_unknown_adapter_name_is_named(tiny_model, tokenizer):
    agent = make_agent(tiny_model, tokenizer)
    with pytest.raises(ValueError, match="adapter_name='critic'"):
        agent.use_adapter("critic")
    with pytest.raises(ValueError, match="adapter_name='policy'"):
        with agent.select_adapter("policy"):
            pass


def test_missing_network_is_named(tokenizer):
    with pytest.raises(ValueError, match="actor_network"):
        LLMAlgorithm(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)


def test_inspect_attributes_returns_plain_hyperparameters(tiny_model, tokenizer):
    agent = make_agent(tiny_model, tokenizer, index=2, batch_size=4)
    attributes = LLMAlgorithm.inspect_attributes(agent)
    assert attributes["lr"] == 1e-2 and attributes["batch_size"] == 4 and attributes["index"] == 2
    assert "actor" not in attributes and "optimizer" not in attributes
    args_only = LLMAlgorithm.inspect_attributes(agent, input_args_only=True)
    assert "reference_update_tracker" in attributes and "reference_update_tracker" not in args_only


def test_update_lr_reaches_the_optimizer(tiny_model, tokenizer):
    agent = make_agent(tiny_model, tokenizer)
    LLMAlgorithm.update_lr(agent.optimizer, 3e-4)
    assert all(group["lr"] == 3e-4 for group in agent.optimizer.param_groups)
    with pytest.raises(ValueError, match="lr"):
        LLMAlgorithm.update_lr(agent.optimizer, 0.0)


def test_works_under_a_single_process_accelerator(tiny_model, tokenizer, batch):
    accelerator = Accelerator(cpu=True)
    agent = make_agent(tiny_model, tokenizer, accelerator=accelerator)
    before = snapshot(agent)
    train_one_step(agent, batch)
    after = snapshot(agent)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".actor." in n)
    clone = agent.clone(index=1)
    torch.testing.assert_close(
        clone.get_logprobs(batch.input_ids, batch.attention_mask),
        agent.get_logprobs(batch.input_ids, batch.attention_mask),
        rtol=0,
        atol=0,
    )


def test_a_schedule_given_as_a_mapping_is_validated_into_a_config(tiny_model, tokenizer):
    agent = make_agent(tiny_model, tokenizer, cosine_lr_schedule_config={"num_epochs": 10, "warmup_proportion": 0.2})
    assert agent.cosine_lr_schedule_config == CosineLRScheduleConfig(num_epochs=10, warmup_proportion=0.2)
    assert agent.lr_scheduler is not None and agent.optimizer.param_groups[0]["lr"] < agent.lr  # warming up
    with pytest.raises(ValueError, match="cosine_lr_schedule_config.num_epochs: Input should be greater than 0"):
        make_agent(tiny_model, tokenizer, cosine_lr_schedule_config={"num_epochs": 0})
    with pytest.raises(TypeError, match="cosine_lr_schedule_config must be"):
        make_agent(tiny_model, tokenizer, cosine_lr_schedule_config=10)
