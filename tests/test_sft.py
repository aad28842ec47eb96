"""SFT: the env's completion-only mask, zero gradient on prompt tokens, and the loss falling on a tiny task."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm.algorithms.sft import SFT
from agilerl_llm.envs.sft import SFTGym
from agilerl_llm.envs.tasks import get_task
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.sft import finetune_llm_sft


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """initializer_range 0.2: an untrained nano model at 0.02 is nearly uniform and LoRA barely moves it."""
    from agilerl_llm.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("peaked_sft"), "nano", initializer_range=0.2)


def pairs(samples):
    return [{"prompt": s["question"], "completion": s["answer"]} for s in samples]


def make_agent(model_dir, tokenizer, **kwargs):
    kwargs = {"lr": 1e-2, "batch_size": 16, "gradient_checkpointing": False, "max_grad_norm": 1.0} | kwargs
    return SFT(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
               **kwargs)  # fmt: skip


def test_env_masks_the_completion_and_its_eos_only(tokenizer):
    env = SFTGym(pairs([{"question": "reverse: abc", "answer": "cba"}]), pairs([{"question": "q", "answer": "a"}]),
                 tokenizer, data_batch_size_per_gpu=1, system_prompt="be brief")  # fmt: skip
    batch = env.reset()
    text = tokenizer.decode(batch.input_ids[0])
    assert text == "<|system|>be brief<|eos|><|user|>reverse: abc<|eos|><|assistant|>cba<|eos|>"
    trained = [tokenizer.decode(batch.input_ids[0, t + 1]) for t in batch.loss_mask[0].nonzero().flatten()]
    assert trained == ["c", "b", "a", "<|eos|>"]


def test_env_trains_every_assistant_turn_of_a_conversation(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"}]  # fmt: skip
    env = SFTGym([{"messages": messages}], [{"messages": messages}], tokenizer, data_batch_size_per_gpu=1)
    batch = env.reset()
    trained = "".join(tokenizer.decode(batch.input_ids[0, t + 1]) for t in batch.loss_mask[0].nonzero().flatten())
    assert trained == "yo<|eos|>ba<|eos|>"
    with pytest.raises(ValueError, match="'messages' or 'prompt' and 'completion'"):
        SFTGym([{"question": "x"}], [{"question": "x"}], tokenizer)


def test_masking_puts_zero_gradient_on_prompt_tokens(tiny_model_dir, tokenizer):
    from agilerl_llm.losses import sft_loss

    agent = make_agent(tiny_model_dir, tokenizer)
    train, _ = get_task("reverse").make_dataset(4, 1, 0)
    batch = SFTGym(pairs(train), pairs(train), tokenizer, data_batch_size_per_gpu=4).reset()
    logprobs = agent.get_logprobs(batch.input_ids, batch.attention_mask, requires_grad=True)
    logprobs.retain_grad()
    sft_loss(logprobs, batch.loss_mask, float(batch.loss_mask.sum())).backward()
    assert torch.all(logprobs.grad[~batch.loss_mask] == 0)
    assert torch.all(logprobs.grad[batch.loss_mask] != 0)


def test_sft_loss_falls_by_half_and_only_the_actor_moves(peaked_model_dir, tokenizer):
    train, test = get_task("reverse").make_dataset(64, 16, 0)
    env = SFTGym(pairs(train), pairs(test), tokenizer, data_batch_size_per_gpu=16, seed=0)
    agent = make_agent(peaked_model_dir, tokenizer, seed=0)
    frozen = {n: p.detach().clone() for n, p in agent.actor.named_parameters() if ".actor." not in n}
    _, history = finetune_llm_sft([agent], env, max_steps=30, evaluation_interval=30, logger=MetricsLogger(print_every=0),
                                  progress=False)  # fmt: skip
    before, after = history[0]["eval/loss"], history[-1]["eval/loss"]
    assert after < 0.5 * before, (before, after)
    assert history[-1]["loss/sft"] < 0.5 * history[1]["loss/sft"]
    assert agent.fitness == [-before, -after]
    for name, value in agent.actor.named_parameters():
        if ".actor." not in name:
            assert torch.equal(value, frozen[name]), name


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, tokenizer):
    train, _ = get_task("reverse").make_dataset(8, 1, 0)
    batch = SFTGym(pairs(train), pairs(train), tokenizer, data_batch_size_per_gpu=8).reset()
    whole = make_agent(tiny_model_dir, tokenizer, batch_size=8)
    accumulated = make_agent(tiny_model_dir, tokenizer, batch_size=8, micro_batch_size_per_gpu=2)
    metrics_whole, metrics_accumulated = whole.learn(batch), accumulated.learn(batch)
    assert metrics_whole["loss/sft"] == pytest.approx(metrics_accumulated["loss/sft"], rel=1e-5)
    assert metrics_whole["grad_norm"] == pytest.approx(metrics_accumulated["grad_norm"], rel=1e-4)
    with pytest.raises(ValueError, match="SupervisedBatch"):
        whole.learn((batch.input_ids, batch.loss_mask))
