"""Checks that need a CUDA device: a bf16 training step, the one-process accelerator path and peak memory.

Skipped without CUDA. On a GPU machine: ``python -m pytest -m gpu -s tests/test_gpu.py`` (the figures print).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm import GRPO, SFT, SFTGym, make_accelerator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def trainable(agent) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in agent.actor.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_grpo_step_on_cuda_trains_and_reports_memory(tiny_model_dir, tokenizer, dtype):
    """Rollout + learn on the GPU in bf16 and fp32: finite metrics, the adapters move, peak memory printed."""
    network = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=network, device="cuda", group_size=4,
                 batch_size=8, max_output_tokens=8, lr=1e-2, gradient_checkpointing=True, seed=0)  # fmt: skip
    prompts = tokenizer(["1+2=", "3+4="], return_tensors="pt", padding=True, padding_side="left")
    torch.cuda.reset_peak_memory_stats()
    before = trainable(agent)
    result = agent.get_action({"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"]})
    rewards = torch.rand(2, 4)
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    assert result.completion_ids.device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert any(not torch.equal(before[k], v) for k, v in trainable(agent).items())
    print(f"\n{dtype}: GRPO step peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")


def test_make_accelerator_in_one_process_uses_the_gpu(tiny_model_dir, tokenizer):
    """Without a launcher: one process, the accelerator's CUDA device, the single-process backend."""
    accelerator = make_accelerator()
    samples = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(8)]
    env = SFTGym(samples, samples[:4], tokenizer, data_batch_size_per_gpu=4)
    agent = SFT(tokenizer.pad_token_id, tokenizer.pad_token,
                actor_network=AutoModelForCausalLM.from_pretrained(tiny_model_dir), accelerator=accelerator,
                batch_size=4, lr=1e-2, gradient_checkpointing=False)  # fmt: skip
    assert agent.dist.backend == "single" and agent.device.type == "cuda"
    first = agent.learn(env.reset())["loss/sft"]
    for _ in range(5):
        last = agent.learn(env.advance())["loss/sft"]
    assert last < first
