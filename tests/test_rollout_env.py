"""Rollouts with HF generate and the reasoning environment, on a real tiny model and tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm.algorithms.experience import Experience
from agilerl_llm.algorithms.grpo import GRPO
from agilerl_llm.envs.reasoning import ReasoningGym, RewardFunctionError
from agilerl_llm.rollout.base import masks_from_lengths
from agilerl_llm.rollout.hf import completion_lengths

DATA = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 120, 10) for b in range(3)]


def make_env(tokenizer, reward_fn=None, batch=3, **kwargs) -> ReasoningGym:
    reward_fn = reward_fn or (lambda completion, answer, prompt: float(completion.strip() == answer))
    return ReasoningGym(DATA[:30], DATA[30:], tokenizer, reward_fn, data_batch_size_per_gpu=batch, **kwargs)


def make_agent(tiny_model_dir, tokenizer, **kwargs) -> GRPO:
    kwargs = {"group_size": 4, "max_output_tokens": 6, "gradient_checkpointing": False, "lr": 1e-2} | kwargs
    return GRPO(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        **kwargs,
    )


def test_completion_lengths_stop_at_the_first_eos_even_when_pad_equals_eos():
    generated = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert completion_lengths(generated, [2]).tolist() == [2, 4, 1]


def test_masks_come_from_lengths_and_align_with_next_token_positions():
    prompt_mask = torch.tensor([[False, True, True], [True, True, True]])
    attention, action = masks_from_lengths(prompt_mask, torch.tensor([2, 0]), completion_width=3)
    assert attention.tolist() == [[False, True, True, True, True, False], [True, True, True, False, False, False]]
    # position t scores token t+1; the completion starts at token 3, so positions 2 and 3 are actions
    assert action.tolist() == [[False, False, True, True, False], [False] * 5]


def test_env_renders_chat_template_left_padded_batches(tokenizer):
    env = make_env(tokenizer, system_prompt="Add.")
    batch = env.reset()
    assert len(batch) == 3
    assert batch.texts[0].startswith("<|system|>Add.<|eos|><|user|>") and batch.texts[0].endswith("<|assistant|>")
    assert batch.attention_mask[:, -1].all()  # left padding: every prompt ends at the last column
    for row, text in enumerate(batch.texts):
        ids = batch.input_ids[row][batch.attention_mask[row]]
        assert tokenizer.decode(ids) == text


def test_get_action_groups_completions_and_marks_generated_tokens(tiny_model_dir, tokenizer):
    env = make_env(tokenizer)
    agent = make_agent(tiny_model_dir, tokenizer)
    prompts = env.reset()
    result = agent.get_action(prompts)
    rows, width = result.completion_ids.shape
    assert rows == 3 * 4
    for row in range(rows):  # rows of one group share their prompt
        assert torch.equal(result.completion_ids[row, : result.prompt_length], prompts.input_ids[row // 4])
    lengths = result.action_masks.sum(1)
    assert torch.equal(lengths, result.completion_lengths)
    assert (lengths >= 1).all() and (lengths <= 6).all()
    assert torch.equal(result.attention_mask[:, result.prompt_length :].sum(1), result.completion_lengths)
    assert not any(p.grad is not None for p in agent.actor.parameters())
    rewards = env.score(prompts, result)
    assert rewards.shape == (3, 4)
    greedy = agent.get_action(prompts, training=False)
    assert greedy.completion_ids.shape[0] == 3
    assert torch.equal(greedy.completion_ids, agent.get_action(prompts, training=False).completion_ids)


def test_sampling_logprobs_equal_training_logprobs_on_left_padded_batches(tiny_model_dir, tokenizer):
    """Generation and the training forward see the same positions, so the first ratio is exactly 1."""
    env = make_env(tokenizer, batch=4)
    agent = make_agent(tiny_model_dir, tokenizer, temperature=0.7, top_p=1.0, top_k=0)
    prompts = env.reset()
    assert not prompts.attention_mask.all()  # the batch really is padded
    out = agent.actor.generate(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask.long(),
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=5,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = out.sequences[:, prompts.input_ids.shape[1] :]
    kept = torch.arange(5)[None] < completion_lengths(generated, [tokenizer.eos_token_id])[:, None]
    sampled = torch.stack(
        [torch.log_softmax(s, -1).gather(1, generated[:, i : i + 1])[:, 0] for i, s in enumerate(out.scores)], dim=1
    )
    attention = torch.cat([prompts.attention_mask, kept], dim=1)
    ours = agent.get_logprobs(out.sequences, attention, temperature=0.7)[:, prompts.input_ids.shape[1] - 1 :]
    assert kept.sum() >= 10
    torch.testing.assert_close(ours[kept], sampled[kept], atol=2e-5, rtol=1e-5)


def test_reward_errors_name_the_sample(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)

    def broken(completion, answer, prompt):
        raise KeyError("oops")

    env = make_env(tokenizer, reward_fn=broken)
    prompts = env.reset()
    with pytest.raises(RewardFunctionError, match="sample 0"):
        env.step(agent.get_action(prompts))
    env = make_env(tokenizer, reward_fn=lambda c, a, p: math.nan)
    prompts = env.reset()
    with pytest.raises(RewardFunctionError, match="returned nan for sample 0"):
        env.step(agent.get_action(prompts))


def test_training_order_is_seeded_and_resumable(tokenizer):
    env = make_env(tokenizer, seed=7)
    env.reset()
    for _ in range(12):  # past one epoch (30 samples / 3)
        env.advance()
    state = env.state_dict()
    expected = [env.advance().questions for _ in range(3)]
    restored = make_env(tokenizer, seed=0)
    restored.load_state_dict(state)
    assert [restored.advance().questions for _ in range(3)] == expected
    assert make_env(tokenizer, seed=7).reset().questions != make_env(tokenizer, seed=8).reset().questions
    served = []
    fresh = make_env(tokenizer, seed=7)
    served += fresh.reset().questions
    for _ in range(9):
        served += fresh.advance().questions
    assert sorted(served) == sorted(d["question"] for d in DATA[:30])  # one epoch serves each sample once


def test_eval_mode_serves_the_whole_held_out_split_and_keeps_the_training_position(tiny_model_dir, tokenizer):
    env = make_env(tokenizer, batch=4)
    agent = make_agent(tiny_model_dir, tokenizer)
    env.reset()
    position = env.state_dict()
    rewards = agent.test(env)
    assert rewards.shape == (6,)  # 36 - 30 held-out samples, one greedy completion each
    assert env.state_dict() == position
    assert len(agent.fitness) == 1


def test_experience_derives_the_attention_mask_from_structure(tiny_model_dir, tokenizer):
    env = make_env(tokenizer)
    agent = make_agent(tiny_model_dir, tokenizer)
    result = agent.get_action(env.reset())
    rewards = torch.zeros(3, 4)
    derived = Experience.from_input(
        (result.completion_ids, result.action_masks, rewards), tokenizer.pad_token_id, torch.device("cpu")
    )
    assert torch.equal(derived.attention_mask, result.attention_mask)
    with pytest.raises(ValueError, match="action_masks has shape"):
        Experience.from_input((result.completion_ids, result.action_masks[:, :-1], rewards), 0, torch.device("cpu"))


def test_a_row_missing_its_answer_mid_dataset_is_named(tokenizer):
    from agilerl_llm.envs.reasoning import ReasoningGym

    rows = [{"question": "1+1=", "answer": "2"}, {"question": "2+2="}]
    env = ReasoningGym(rows, rows[:1], tokenizer, lambda c, a, p: 0.0, data_batch_size_per_gpu=2)
    with pytest.raises(ValueError, match=r"a dataset row lacks the field 'answer': \{'question': '2\+2='\}"):
        env.reset()


def test_prompts_past_the_models_context_are_refused_and_generation_is_capped(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from agilerl_llm.rollout.base import SamplingSettings
    from agilerl_llm.rollout.hf import generate_completions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    limit = model.config.max_position_embeddings
    common = {"num_completions": 1, "do_sample": False, "pad_token_id": 0, "eos_token_ids": [1]}
    too_long = torch.full((1, limit), 10)
    with pytest.raises(ValueError, match=rf"at or over the model's max_position_embeddings={limit}"):
        generate_completions(
            model,
            too_long,
            torch.ones_like(too_long, dtype=torch.bool),
            sampling=SamplingSettings(max_model_len=4 * limit),
            **common,
        )
    near = torch.full((1, limit - 3), 10)
    result = generate_completions(
        model,
        near,
        torch.ones_like(near, dtype=torch.bool),
        sampling=SamplingSettings(max_model_len=4 * limit),
        **common,
    )
    assert result.completion_ids.shape[1] <= limit
