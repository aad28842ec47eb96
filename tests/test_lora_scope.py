"""lora_target_scope on a composite model: a tiny Llava (CLIP vision tower + projector + Qwen2 language model)
built in code, whose vision tower has linear layers with the same names as the language model's."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from agilerl_llm import GRPO
from agilerl_llm.model.lora_scope import adapt_lora_config_for_model

PROMPT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
PROMPT_MASK = PROMPT_IDS != 0


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                eos_token_id=1),
        image_token_id=299,
    )  # fmt: skip
    return LlavaForConditionalGeneration(config)


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0} | kwargs))


def lora_module_paths(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}


def linear_paths(model: torch.nn.Module, inside: str) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and f".{inside}." in f".{n}"}


def make_agent(network, **kwargs):
    settings = {"group_size": 2, "batch_size": 4, "lr": 1e-2, "max_output_tokens": 3, "beta": 0.0,
                "lora_config": lora()} | kwargs  # fmt: skip
    return GRPO(0, "<pad>", actor_network=network, gradient_checkpointing=False, seed=3, **settings)


def test_the_scope_keeps_every_adapter_inside_the_language_model():
    model = tiny_llava()
    language_linears = linear_paths(model, "language_model")
    vision_linears = linear_paths(model, "vision_tower") | linear_paths(model, "multi_modal_projector")
    assert language_linears and vision_linears
    # Without a scope "all-linear" also adapts the vision tower: the scope is what keeps it out.
    unscoped = make_agent(tiny_llava())
    assert {p.removeprefix("base_model.model.") for p in lora_module_paths(unscoped.actor)} >= vision_linears

    agent = make_agent(model, lora_target_scope="language_model")
    adapted = {p.removeprefix("base_model.model.") for p in lora_module_paths(agent.actor)}
    assert adapted == language_linears
    assert "language_model" in str(agent.lora_config.target_modules)
    # Only the language model's adapters train; the vision tower and the projector have no LoRA weights at all.
    trainable = [n for n, p in agent.actor.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model." in n and "lora_" in n for n in trainable)


def test_grpo_learns_text_only_on_the_scoped_composite_model(tmp_path):
    agent = make_agent(tiny_llava(), lora_target_scope="language_model")
    before = {n: p.detach().clone() for n, p in agent.actor.named_parameters()}
    result = agent.get_action({"input_ids": PROMPT_IDS, "attention_mask": PROMPT_MASK.long()})
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values() if isinstance(v, (int, float)))
    moved = {n for n, p in agent.actor.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".language_model." in n and ".actor." in n for n in moved)

    # The scoped agent's checkpoint loads into a fresh scoped agent and gives the same log-probs.
    agent.save_checkpoint(str(tmp_path / "ckpt"))
    fresh = make_agent(tiny_llava(), lora_target_scope="language_model")
    fresh.load_checkpoint(str(tmp_path / "ckpt"))
    torch.testing.assert_close(fresh.get_logprobs(PROMPT_IDS, PROMPT_MASK), agent.get_logprobs(PROMPT_IDS, PROMPT_MASK))
    assert fresh.lora_target_scope == "language_model"


def test_scoping_twice_gives_the_same_config_and_the_exact_list_when_the_short_pattern_would_catch_more():
    model = tiny_llava()
    once = adapt_lora_config_for_model(lora(), model, "language_model")
    assert adapt_lora_config_for_model(once, model, "language_model").target_modules == once.target_modules
    assert re.fullmatch(once.target_modules, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(once.target_modules, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")

    # Only layer 0's q_proj: the scope + leaf-name pattern would also take layer 1, so every path is listed.
    layer_zero = adapt_lora_config_for_model(
        lora(target_modules=["q_proj"], layers_to_transform=[0]), model, "language_model"
    )
    names = [n for n, _ in model.named_modules() if re.fullmatch(layer_zero.target_modules, n)]
    assert names == ["model.language_model.layers.0.self_attn.q_proj"]
    # None leaves the config alone.
    config = lora()
    assert adapt_lora_config_for_model(config, model, None) is config


@pytest.mark.parametrize(
    ("scope", "config", "message"),
    [
        ("text_model", lora(), "is not a sub-module path"),
        ("language model", lora(), "must be a dotted module path"),
        ("language_model", lora(target_modules=["linear_1"]), "holds none of the modules"),
    ],
)
def test_a_bad_scope_names_the_field(scope, config, message):
    with pytest.raises(ValueError, match=rf"lora_target_scope=.*{message}"):
        adapt_lora_config_for_model(config, tiny_llava(), scope)


def test_a_scope_cannot_re_scope_an_existing_peft_adapter():
    from peft import get_peft_model

    network = get_peft_model(tiny_llava(), lora())
    with pytest.raises(ValueError, match="lora_target_scope='language_model' cannot re-scope"):
        make_agent(network, lora_config=None, lora_target_scope="language_model")
