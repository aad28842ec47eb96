"""The SFT -> DPO -> GRPO chain: each stage's checkpoint loads into the next, the actor becoming the reference."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from agilerl_llm.algorithms.dpo import DPO
from agilerl_llm.algorithms.grpo import GRPO
from agilerl_llm.algorithms.sft import SFT
from agilerl_llm.envs.preference import PreferenceGym
from agilerl_llm.envs.sft import SFTGym
from agilerl_llm.envs.tasks import get_task


def build(cls, model_dir, tokenizer, **kwargs):
    return cls(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
               gradient_checkpointing=False, lr=1e-2, batch_size=8, **kwargs)  # fmt: skip


def test_sft_checkpoint_feeds_dpo_whose_checkpoint_feeds_grpo(tiny_model_dir, tokenizer, tmp_path):
    train, _ = get_task("reverse").make_dataset(8, 1, 0)
    sft = build(SFT, tiny_model_dir, tokenizer)
    assert sft.adapter_names() == ("actor",)
    sft_env = SFTGym([{"prompt": s["question"], "completion": s["answer"]} for s in train],
                     [{"prompt": "q", "completion": "a"}], tokenizer, data_batch_size_per_gpu=8)  # fmt: skip
    sft.learn(sft_env.reset())
    sft.save_checkpoint(tmp_path / "sft")
    sft_actor = sft.adapters.state_dict("actor")

    dpo = build(DPO, tiny_model_dir, tokenizer)
    dpo.load_checkpoint(tmp_path / "sft", load_optimizer=False)
    for name in ("actor", "reference"):
        for key, value in dpo.adapters.state_dict(name).items():
            assert torch.equal(value, sft_actor[key]), (name, key)
    pairs = [{"prompt": s["question"], "chosen": s["answer"], "rejected": s["answer"].upper()} for s in train]
    metrics = dpo.learn(PreferenceGym(pairs, pairs, tokenizer, data_batch_size_per_gpu=8).reset())
    assert abs(metrics["loss/dpo"] - math.log(2.0)) < 1e-6  # the reference is the SFT actor
    dpo.save_checkpoint(tmp_path / "dpo")
    dpo_actor = dpo.adapters.state_dict("actor")
    assert any(not torch.equal(dpo_actor[k], v) for k, v in sft_actor.items())

    grpo = build(GRPO, tiny_model_dir, tokenizer, group_size=2)
    grpo.load_checkpoint(tmp_path / "dpo", load_optimizer=False)
    for name in ("actor", "reference"):
        for key, value in grpo.adapters.state_dict(name).items():
            assert torch.equal(value, dpo_actor[key]), (name, key)
    assert grpo.beta == 0.001  # a new stage keeps its own hyperparameters (DPO's beta is 0.1)
