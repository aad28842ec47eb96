"""DPO: settings, log 2 at init, preference accuracy rising on held-out pairs, the loop."""

from __future__ import annotations

import math

import pytest
from transformers import AutoModelForCausalLM

from agilerl_llm.algorithms.dpo import DPO
from agilerl_llm.envs.preference import PreferenceGym
from agilerl_llm.envs.tasks import get_task
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.preference import finetune_llm_preference


def preference_pairs(samples):
    """Chosen: the lowercase answer; rejected: the same letters upper-cased (a rule that generalises)."""
    return [{"prompt": s["question"], "chosen": s["answer"], "rejected": s["answer"].upper()} for s in samples]


def make_env(tokenizer, num_train=32, num_test=16, batch=16):
    train, test = get_task("reverse").make_dataset(num_train, num_test, 0)
    return PreferenceGym(preference_pairs(train), preference_pairs(test), tokenizer, data_batch_size_per_gpu=batch)


def make_agent(model_dir, tokenizer, **kwargs):
    kwargs = {"lr": 1e-2, "batch_size": 16, "gradient_checkpointing": False, "max_grad_norm": 1.0} | kwargs
    return DPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
               **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "kto"}, "loss_type"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ],  # fmt: skip
)
def test_bad_arguments_name_the_field(tiny_model_dir, tokenizer, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_agent(tiny_model_dir, tokenizer, **kwargs)


def test_env_checks_fields_and_pads_pairs_together(tokenizer):
    with pytest.raises(ValueError, match="rejected"):
        PreferenceGym([{"prompt": "a", "chosen": "b"}], [{"prompt": "a", "chosen": "b"}], tokenizer)
    batch = make_env(tokenizer, batch=4).reset()
    assert batch.chosen.input_ids.shape == batch.rejected.input_ids.shape
    assert batch.stacked().input_ids.shape[0] == 8


@pytest.mark.parametrize("separate_reference", [True, False])
def test_sigmoid_loss_at_init_is_log_two(tiny_model_dir, tokenizer, separate_reference):
    agent = make_agent(tiny_model_dir, tokenizer, use_separate_reference_adapter=separate_reference)
    metrics = agent.learn(make_env(tokenizer, batch=8).reset())
    assert metrics["loss/dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["grad_norm"] > 0


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_preference_accuracy_rises_above_point_eight(tiny_model_dir, tokenizer, loss_type):
    env = make_env(tokenizer)
    agent = make_agent(
        tiny_model_dir, tokenizer, loss_type=loss_type, label_smoothing=0.1 if loss_type == "sigmoid" else 0
    )
    _, history = finetune_llm_preference([agent], env, max_steps=8, evaluation_interval=8,
                                         logger=MetricsLogger(print_every=0), progress=False)  # fmt: skip
    assert history[0]["eval/accuracy"] < 0.5
    assert history[-1]["eval/accuracy"] > 0.8, history[-1]
    assert history[-1]["eval/margin"] > 0
    assert {"rewards/accuracy", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(
        history[-1]
    )
    assert agent.fitness[-1] == history[-1]["eval/accuracy"]
