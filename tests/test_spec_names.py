"""The spec's import paths work as written, with agilerl_llm for agilerl (issue 16, item 5)."""

from __future__ import annotations

import torch
from helpers import tiny_grpo
from peft import PeftModel
from transformers import AutoModelForCausalLM

import agilerl_llm


def test_algorithms_import_from_the_algorithms_package():
    from agilerl_llm.algorithms import CISPO, DPO, GRPO, GSPO, LLMPPO, SFT, LLMReinforce

    assert (GRPO, GSPO, CISPO, LLMPPO, LLMReinforce, DPO, SFT) == (
        agilerl_llm.GRPO, agilerl_llm.GSPO, agilerl_llm.CISPO, agilerl_llm.LLMPPO, agilerl_llm.LLMReinforce,
        agilerl_llm.DPO, agilerl_llm.SFT,
    )  # fmt: skip
    assert issubclass(GSPO, GRPO) and issubclass(CISPO, GRPO)


def test_save_llm_checkpoint_from_utils_writes_an_adapter_peft_loads(tiny_model_dir, tokenizer, tmp_path):
    from agilerl_llm.utils.utils import save_llm_checkpoint

    agent = tiny_grpo(tiny_model_dir, tokenizer)
    with torch.no_grad():  # move the adapter off its zero init so the comparison means something
        for parameter in agent.adapters.parameters("actor"):
            parameter.add_(0.01)
    save_llm_checkpoint(agent, tmp_path / "ckpt")
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "ckpt" / "actor"
    )
    ids = torch.tensor([[3, 4, 5, 6]])
    agent.adapters.activate("actor")
    expected = agent.actor(input_ids=ids).logits
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
