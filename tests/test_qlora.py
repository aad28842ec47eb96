"""QLoRA on the CPU: a real bitsandbytes 4-bit / 8-bit base under real PEFT adapters."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm import GRPO
from agilerl_llm.checkpoint.export import export_policy
from agilerl_llm.envs.reasoning import ReasoningGym
from agilerl_llm.model.quantization import is_quantized
from agilerl_llm.testing import save_tiny_model

pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig  # noqa: E402

PROMPT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
PROMPT_MASK = PROMPT_IDS != 0


def nf4(**kwargs):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              **kwargs)  # fmt: skip


def make_agent(model_dir, tokenizer, quantization_config=None, **kwargs):
    settings = {"group_size": 4, "batch_size": 8, "lr": 2e-2, "max_output_tokens": 3, "beta": 0.0} | kwargs
    return GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=str(model_dir), gradient_checkpointing=False,
                seed=3, quantization_config=quantization_config or nf4(), **settings)  # fmt: skip


def quantized_layers(agent):
    import bitsandbytes as bnb

    return [m for m in agent.actor.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.mark.parametrize("config", [nf4(), BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                                    BitsAndBytesConfig(load_in_8bit=True)], ids=["nf4", "fp4", "int8"])  # fmt: skip
def test_the_base_is_quantized_but_the_head_is_not_and_log_probs_are_exact(tiny_model_dir, tokenizer, config):
    agent = make_agent(tiny_model_dir, tokenizer, config)
    assert is_quantized(agent.actor) and quantized_layers(agent)
    head = agent.actor.get_base_model().lm_head
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert "lm_head" in agent.quantization_config.llm_int8_skip_modules
    # The fused op over the full-precision head gives exactly the model's own log-softmax.
    with torch.no_grad():
        logits = agent.actor(input_ids=PROMPT_IDS, attention_mask=PROMPT_MASK.long()).logits
    expected = logits[:, :-1].float().log_softmax(-1).gather(-1, PROMPT_IDS[:, 1:, None])[..., 0]
    ours = agent.get_logprobs(PROMPT_IDS, PROMPT_MASK)
    real = PROMPT_MASK[:, 1:]
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-5, atol=1e-5)


def test_a_no_grad_eval_pass_leaves_every_4bit_layer_on_the_autograd_path(tiny_model_dir, tokenizer):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer, for good, into its inference kernel's layout the
    first time the layer sees a no-grad input in eval mode; that kernel has no backward. Rollouts and reference
    passes are exactly such inputs, so after one the training forward must still send gradient to the adapters of
    the lowest layer (through every quantized layer above it). On a CPU without AVX512-BF16 this holds anyway."""
    agent = make_agent(tiny_model_dir, tokenizer)
    agent.set_training_mode(False)
    agent.get_logprobs(PROMPT_IDS, PROMPT_MASK, policy="reference")
    agent.get_logprobs(PROMPT_IDS, PROMPT_MASK)
    states = [layer.weight.quant_state for layer in quantized_layers(agent)]
    assert not any(getattr(state, "packing_format_for_cpu", False) for state in states)
    agent.set_training_mode(True)
    agent.get_logprobs(PROMPT_IDS, PROMPT_MASK, requires_grad=True)[PROMPT_MASK[:, 1:]].sum().backward()
    # lora_B, not lora_A: B starts at zero, so A has no gradient at the first step whatever the path.
    lowest = [p for n, p in agent.actor.named_parameters() if "layers.0." in n and "lora_B.actor" in n]
    assert lowest and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lowest)


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("peaked_q"), "nano", initializer_range=0.2)


def test_grpo_learns_on_a_4bit_base(peaked_model_dir, tokenizer):
    """Reward = share of lowercase letters in the completion (about 10% at first): GRPO on the 4-bit base must find
    and reinforce them, moving only the adapters."""
    agent = make_agent(peaked_model_dir, tokenizer, lr=1e-2, group_size=8, batch_size=24, temperature=1.0, top_k=0,
                       top_p=1.0, max_output_tokens=4, min_output_tokens=4)  # fmt: skip
    data = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 120, 10) for b in range(3)]
    env = ReasoningGym(data, data, tokenizer, lambda c, a, p: sum(ch.islower() for ch in c) / max(len(c), 1),
                       data_batch_size_per_gpu=3)  # fmt: skip
    frozen = {n: p.detach().clone() for n, p in agent.actor.named_parameters() if not p.requires_grad}
    prompts, rewards = env.reset(), []
    for _ in range(30):
        result = agent.get_action(prompts)
        batch_rewards = env.score(prompts, result)
        agent.learn((result.completion_ids, result.action_masks, batch_rewards, result.attention_mask))
        rewards.append(float(batch_rewards.mean()))
        prompts = env.advance()
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.4, rewards
    for name, parameter in agent.actor.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"{name} moved"


def test_clones_share_the_quantized_base(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    clone = agent.clone(index=1)
    originals, copies = quantized_layers(agent), quantized_layers(clone)
    assert len(originals) == len(copies) > 0
    for original, copy in zip(originals, copies, strict=True):
        assert original.weight.data_ptr() == copy.weight.data_ptr()
    torch.testing.assert_close(clone.get_logprobs(PROMPT_IDS, PROMPT_MASK), agent.get_logprobs(PROMPT_IDS, PROMPT_MASK))


@pytest.mark.parametrize(("lora_only", "save_optimizer"), [(True, True), (True, False), (False, True), (False, False)])
def test_the_checkpoint_grid_on_a_quantized_base(tiny_model_dir, tokenizer, tmp_path, lora_only, save_optimizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    torch.manual_seed(0)
    result = agent.get_action({"input_ids": PROMPT_IDS, "attention_mask": PROMPT_MASK.long()})
    agent.learn((result.completion_ids, result.action_masks, torch.rand(2, 4), result.attention_mask))
    agent.save_checkpoint(str(tmp_path / "ckpt"), lora_only=lora_only, save_optimizer=save_optimizer)
    expected = agent.get_logprobs(PROMPT_IDS, PROMPT_MASK)

    fresh = make_agent(tiny_model_dir, tokenizer)
    fresh.load_checkpoint(str(tmp_path / "ckpt"), load_optimizer=save_optimizer)
    torch.testing.assert_close(fresh.get_logprobs(PROMPT_IDS, PROMPT_MASK), expected, rtol=0, atol=0)
    rebuilt = GRPO.load(str(tmp_path / "ckpt"))
    assert is_quantized(rebuilt.actor) and rebuilt.quantization_config.bnb_4bit_quant_type == "nf4"
    torch.testing.assert_close(rebuilt.get_logprobs(PROMPT_IDS, PROMPT_MASK), expected, rtol=0, atol=0)


def test_export_merges_into_a_dequantized_copy_and_says_so(tiny_model_dir, tokenizer, tmp_path, caplog):
    agent = make_agent(tiny_model_dir, tokenizer)
    torch.manual_seed(0)
    result = agent.get_action({"input_ids": PROMPT_IDS, "attention_mask": PROMPT_MASK.long()})
    agent.learn((result.completion_ids, result.action_masks, torch.rand(2, 4), result.attention_mask))
    with caplog.at_level(logging.WARNING):
        export_policy(agent, tmp_path / "hf", tokenizer)
    assert "merged into a dequantized float32 copy" in caplog.text
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not is_quantized(exported) and exported.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        theirs = exported(input_ids=PROMPT_IDS, attention_mask=PROMPT_MASK.long()).logits
        ours = agent.actor(input_ids=PROMPT_IDS, attention_mask=PROMPT_MASK.long()).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert is_quantized(agent.actor)  # the live agent is untouched


def test_bad_quantization_settings_are_named(tiny_model_dir, tokenizer):
    with pytest.raises(TypeError, match="quantization_config must be a transformers.BitsAndBytesConfig"):
        make_agent(tiny_model_dir, tokenizer, quantization_config={"load_in_4bit": True})
    with pytest.raises(ValueError, match="pass model_name instead of actor_network"):
        GRPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(
            tiny_model_dir), quantization_config=nf4(), gradient_checkpointing=False)  # fmt: skip
    agent = make_agent(tiny_model_dir, tokenizer, nf4(llm_int8_skip_modules=["mlp.down_proj"]))
    assert agent.quantization_config.llm_int8_skip_modules == ["mlp.down_proj", "lm_head"]


def test_qlora_memory_benchmark_smoke_run():
    """benchmarks/qlora_memory.py on the nano model: a row per base, and the 4-bit weights are the smallest."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "qlora_memory.py"
    output = subprocess.run([sys.executable, str(script), "--model-size", "nano", "--steps", "1"], check=True,
                            capture_output=True, text=True, timeout=600).stdout  # fmt: skip
    rows = {line.split()[0]: line.split() for line in output.splitlines() if line.split()[:1] in (["fp32"], ["nf4"],
                                                                                                   ["int8"])}  # fmt: skip
    assert set(rows) == {"fp32", "nf4", "int8"}
    assert float(rows["nf4"][1]) <= float(rows["int8"][1]) < float(rows["fp32"][1])
    assert rows["fp32"][-1] == "1.00x"
