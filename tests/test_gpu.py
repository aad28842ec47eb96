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


@pytest.mark.vllm
@pytest.mark.parametrize(("sleep_mode", "level"), [(False, 1), (True, 1), (True, 2)])
def test_vllm_on_cuda_sleeps_offloads_and_still_serves_the_new_adapter(tmp_path, sleep_mode, level):
    """sleep_mode (levels 1 and 2) and use_memory_efficient_params on CUDA: after every learn step vLLM's greedy
    completions equal HF generate on the trainer's weights (a woken engine still serves the new adapter), the
    trainer's base is back on the GPU after each rollout, and the engine frees memory while asleep."""
    pytest.importorskip("vllm")
    from agilerl_llm import VLLMConfig
    from agilerl_llm.rollout.hf import HFRolloutEngine
    from agilerl_llm.testing import build_tiny_tokenizer, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", "tiny", initializer_range=0.2)
    tok = build_tiny_tokenizer()
    config = VLLMConfig(sleep_mode=sleep_mode, sleep_mode_level=level, gpu_memory_utilization=0.2, max_num_seqs=16)
    agent = GRPO(tok.pad_token_id, tok.pad_token, model_name=str(model_dir), device="cuda", use_vllm=True,
                 vllm_config=config, use_memory_efficient_params=True, group_size=4, batch_size=8, lr=5e-3,
                 beta=0.0, max_output_tokens=10, gradient_checkpointing=False)  # fmt: skip
    encoded = tok(["abc", "hello"], return_tensors="pt", padding=True)
    obs = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    for step in range(3):
        result = agent.get_action(obs, training=True)
        assert all(p.device.type == "cuda" for p in agent.actor.parameters()), "the trainer's base did not come back"
        free_asleep = torch.cuda.mem_get_info()[0]
        greedy = agent.get_action(obs, training=False).completion_ids
        engine, agent.rollout_engine = agent.rollout_engine, HFRolloutEngine()
        expected = agent.get_action(obs, training=False).completion_ids
        agent.rollout_engine = engine
        assert torch.equal(greedy, expected), f"step {step}: the engine served stale weights"
        agent.learn((result.completion_ids, result.action_masks, torch.rand(2, 4), result.attention_mask),
                    sampling_logps=result.sampling_logprobs)  # fmt: skip
        print(f"\nsleep_mode={sleep_mode} level={level} step {step}: free CUDA memory while learning "
              f"{free_asleep / 2**30:.2f} GiB")  # fmt: skip


def test_liger_model_patches_on_cuda_match_the_unpatched_model_and_stay_on_that_instance(tiny_model_dir, tokenizer):
    """The patched decoder's hidden states equal the unpatched one's; a model built afterwards is unpatched."""
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen2 import modeling_qwen2

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to("cuda")
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir), device="cuda",
                 gradient_checkpointing=False)  # fmt: skip
    assert agent.liger_model_patches
    decoder = agent.policy_forward_module.backbone
    assert "Liger" in decoder.norm.forward.__qualname__ and "Liger" in decoder.layers[0].mlp.forward.__qualname__
    assert modeling_qwen2.Qwen2RMSNorm.__name__ == "Qwen2RMSNorm" and modeling_qwen2.Qwen2MLP.__name__ == "Qwen2MLP"
    ids = torch.randint(3, len(tokenizer), (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad(), agent.adapters.disabled():
        patched = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        unpatched = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(patched, unpatched, atol=1e-4, rtol=1e-4)


def test_sft_with_liger_cross_entropy_on_cuda_equals_the_standard_path(tiny_model_dir, tokenizer):
    pytest.importorskip("liger_kernel")
    ids = torch.randint(3, len(tokenizer), (4, 16), device="cuda")
    mask = torch.ones_like(ids)
    logprobs = []
    for liger in (False, True):
        agent = SFT(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(tiny_model_dir), device="cuda",
                    gradient_checkpointing=False, use_liger_loss=liger)  # fmt: skip
        logprobs.append(agent.get_logprobs(ids, mask))
    torch.testing.assert_close(logprobs[1], logprobs[0], atol=1e-4, rtol=1e-4)
