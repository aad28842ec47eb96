"""The lean LoRA forward (model/lean_lora.py) gives what PEFT's own forward gives, outputs and gradients, and leaves
every case it does not cover to PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_grpo
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from agilerl_llm.model.lean_lora import LeanLoraLinear, use_lean_lora_layers


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)))


def _peft_block(dtype=torch.float32, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {"r": 4, "lora_alpha": 12, "target_modules": ["proj", "out"]} | config
    model = get_peft_model(_Block().to(dtype), LoraConfig(**settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: move it, or the adapter adds nothing
                parameter.normal_(0, 0.5)
    return model


def _output_and_grads(model: torch.nn.Module, x: torch.Tensor, seed: int = 1, **kwargs):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks on both sides
    out = model(x, **kwargs) if kwargs else model(x)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _both(dtype=torch.float32, **config):
    peft = _peft_block(dtype, **config)
    lean = copy.deepcopy(peft)
    assert use_lean_lora_layers(lean) == 2
    return peft, lean


@pytest.mark.parametrize(
    "config",
    [{}, {"lora_dropout": 0.3}, {"use_rslora": True}],
    ids=["plain", "dropout in training mode", "rslora scaling"],
)
def test_the_lean_forward_matches_peft_in_outputs_and_gradients(config):
    peft, lean = _both(**config)
    x = torch.randn(3, 7, 8)
    expected, lean_out = _output_and_grads(peft, x), _output_and_grads(lean, x)
    torch.testing.assert_close(lean_out[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lean_out[1], expected[1], rtol=1e-5, atol=1e-5)
    assert lean_out[2].keys() == expected[2].keys() and any("lora_A" in n for n in expected[2])
    for name in expected[2]:
        torch.testing.assert_close(lean_out[2][name], expected[2][name], rtol=1e-5, atol=1e-6)


def test_fp32_adapters_on_a_bf16_base_follow_peft_dtypes():
    peft, lean = _both(torch.bfloat16)
    for model in (peft, lean):  # PEFT's default for a bf16 base: fp32 adapters, bf16 layer outputs
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    expected, lean_out = _output_and_grads(peft, x), _output_and_grads(lean, x)
    assert lean_out[0].dtype == expected[0].dtype == torch.bfloat16
    torch.testing.assert_close(lean_out[0], expected[0], rtol=1e-2, atol=1e-2)
    for name in expected[2]:
        assert lean_out[2][name].dtype == expected[2][name].dtype == torch.float32
        torch.testing.assert_close(lean_out[2][name], expected[2][name], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["disabled", "merged", "dora", "lora bias", "two active adapters"])
def test_cases_outside_the_plain_one_give_what_peft_gives(case):
    config = {"use_dora": True} if case == "dora" else {"lora_bias": True} if case == "lora bias" else {}
    peft, lean = _both(**config)
    x = torch.randn(4, 8)
    if case == "two active adapters":
        for model in (peft, lean):
            torch.manual_seed(2)  # the same initial weights for the new adapter on both sides
            model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["proj", "out"]))
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B.second" in name:
                        parameter.normal_(0, 0.5)
            model.base_model.set_adapter(["default", "second"])
    results = []
    for model in (peft, lean):
        if case == "disabled":
            with model.disable_adapter():
                results.append(_output_and_grads(model, x))
            continue
        if case == "merged":
            model.merge_adapter()
        results.append(_output_and_grads(model, x))
    expected, lean_out = results
    torch.testing.assert_close(lean_out[0], expected[0], rtol=1e-6, atol=1e-6)
    assert lean_out[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(lean_out[2][name], expected[2][name], rtol=1e-5, atol=1e-6)


def test_agents_get_the_lean_layers_and_sampling_still_merges_them(tiny_model_dir, tokenizer):
    agent = tiny_grpo(tiny_model_dir, tokenizer)
    layers = [m for m in agent.actor.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is LeanLoraLinear for m in layers)
    with agent.adapters.merged_for_sampling():
        assert all("forward" in vars(m) for m in layers)  # each runs one merged matmul here
    assert not any("forward" in vars(m) for m in layers)
    clone = agent.clone()
    assert all(type(m) is LeanLoraLinear for m in clone.actor.modules() if isinstance(m, LoraLinear))
