"""``GRPO.load(path)``: an agent rebuilt from its checkpoint folder alone continues exactly like the original."""

from __future__ import annotations

import shutil

import pytest
import torch

from agilerl_llm import DPO, GRPO, GSPO, LLMPPO, CosineLRScheduleConfig
from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.checkpoint.files import CheckpointError
from agilerl_llm.testing import build_tiny_model, save_tiny_model

PROMPT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
PROMPT_MASK = PROMPT_IDS != 0
REWARDS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def make_agent(model_dir, tokenizer, cls=GRPO, **kwargs):
    settings = {"group_size": 2, "batch_size": 4, "lr": 1e-2, "max_output_tokens": 4, "beta": 0.05} | kwargs
    return cls(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(model_dir), gradient_checkpointing=False,
               seed=3, **settings)  # fmt: skip


def learn_once(agent, seed=0):
    torch.manual_seed(seed)
    result = agent.get_action({"input_ids": PROMPT_IDS, "attention_mask": PROMPT_MASK.long()})
    agent.learn((result.completion_ids, result.action_masks, REWARDS, result.attention_mask))
    return result


def trainable(agent):
    return {name: p.detach().clone() for name, p in agent.actor.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("lora_only", [True, False])
def test_a_loaded_agent_resumes_exactly(tiny_model_dir, tokenizer, tmp_path, lora_only):
    schedule = CosineLRScheduleConfig(num_epochs=10, warmup_proportion=0.2)
    agent = make_agent(tiny_model_dir, tokenizer, cosine_lr_schedule_config=schedule, temperature=0.8)
    learn_once(agent)
    agent.fitness.append(0.25)
    agent.save_checkpoint(str(tmp_path / "ckpt"), lora_only=lora_only, save_optimizer=True)

    loaded = GRPO.load(str(tmp_path / "ckpt"))
    assert type(loaded) is GRPO and loaded.model_name == str(tiny_model_dir)
    assert (loaded.temperature, loaded.beta, loaded.group_size, loaded.fitness) == (0.8, 0.05, 2, [0.25])
    assert loaded.cosine_lr_schedule_config == schedule
    assert loaded.lr_scheduler.state_dict()["last_epoch"] == agent.lr_scheduler.state_dict()["last_epoch"] == 1
    ids, mask = PROMPT_IDS, PROMPT_MASK
    assert torch.equal(loaded.get_logprobs(ids, mask), agent.get_logprobs(ids, mask))
    with agent.select_adapter("reference"), loaded.select_adapter("reference"):
        assert torch.equal(loaded.get_logprobs(ids, mask), agent.get_logprobs(ids, mask))
    # The next update (same rollout seed) gives the same weights: optimizer moments and schedule came back.
    learn_once(agent, seed=1), learn_once(loaded, seed=1)
    original, rebuilt = trainable(agent), trainable(loaded)
    assert original.keys() == rebuilt.keys()
    for name, value in original.items():
        torch.testing.assert_close(rebuilt[name], value, rtol=0, atol=0)


def test_load_rebuilds_the_saved_subclass_and_ppo_with_its_value_head(tiny_model_dir, tokenizer, tmp_path):
    gspo = make_agent(tiny_model_dir, tokenizer, cls=GSPO)
    gspo.save_checkpoint(str(tmp_path / "gspo"))
    assert type(GRPO.load(str(tmp_path / "gspo"))) is GSPO
    assert type(LLMAlgorithm.load(str(tmp_path / "gspo"))) is GSPO

    ppo = make_agent(tiny_model_dir, tokenizer, cls=LLMPPO, beta=0.0)
    learn_once(ppo)
    ppo.save_checkpoint(str(tmp_path / "ppo"))
    loaded = LLMPPO.load(str(tmp_path / "ppo"))
    for name, value in ppo.value_head.state_dict().items():
        assert torch.equal(loaded.value_head.state_dict()[name], value)
    with pytest.raises(CheckpointError, match=r"holds a GSPO checkpoint, which DPO.load cannot rebuild; use GSPO.load"):
        DPO.load(str(tmp_path / "gspo"))


def test_load_names_a_missing_or_unrecorded_base_model(tokenizer, tmp_path):
    base = save_tiny_model(tmp_path / "base", "nano", architecture="qwen2")
    agent = make_agent(base, tokenizer)
    agent.save_checkpoint(str(tmp_path / "ckpt"))
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=rf"The base model '{base}' recorded in .*attributes.pt cannot be loaded"):
        GRPO.load(str(tmp_path / "ckpt"))

    in_memory = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, gradient_checkpointing=False,
                     actor_network=build_tiny_model("nano", tokenizer=tokenizer))  # fmt: skip
    in_memory.save_checkpoint(str(tmp_path / "memory"))
    with pytest.raises(CheckpointError, match="records no base model"):
        GRPO.load(str(tmp_path / "memory"))
    with pytest.raises(FileNotFoundError, match="No agent checkpoint folder"):
        GRPO.load(str(tmp_path / "nowhere"))
