"""QLoRA: a bitsandbytes-quantized frozen base under the LoRA adapters.

``quantization_config`` (a ``transformers.BitsAndBytesConfig``: 4-bit nf4 / fp4, or 8-bit) loads the base
quantized. The ``lm_head`` always stays in full precision: the fused log-prob op multiplies the final hidden
states by its weight, and a quantized head would make every log-prob (and the KL and importance ratios built on
them) approximate. The loaded base is then prepared for k-bit training with PEFT (norms and other
non-quantized parameters in fp32, input gradients on for activation checkpointing).

An export of a quantized agent merges each adapter into a dequantized copy of the weights it adapts
(``merged_dequantized_model``): merging into the 4-bit weights would round a small LoRA update away.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

OUTPUT_HEAD = "lm_head"


def check_quantization_config(config: Any) -> Any:
    """``config`` with ``lm_head`` added to the modules bitsandbytes leaves alone (a copy; None passes through).

    Raises:
        TypeError: ``config`` is not a ``BitsAndBytesConfig``.
        ImportError: bitsandbytes is not installed (the message names the extra).
    """
    if config is None:
        return None
    from transformers import BitsAndBytesConfig

    if not isinstance(config, BitsAndBytesConfig):
        raise TypeError(
            f"quantization_config must be a transformers.BitsAndBytesConfig (4-bit or 8-bit), got {type(config).__name__}."
        )
    if not (config.load_in_4bit or config.load_in_8bit):
        raise ValueError("quantization_config quantizes nothing: set load_in_4bit=True or load_in_8bit=True.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(
            "quantization_config needs bitsandbytes: pip install 'agilerl_llm[bnb]' (it runs on the CPU too)."
        ) from None
    config = copy.deepcopy(config)
    skipped = list(config.llm_int8_skip_modules or [])
    if OUTPUT_HEAD not in skipped:
        config.llm_int8_skip_modules = [*skipped, OUTPUT_HEAD]
    return config


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (a HuggingFace model, or a PEFT model around one) holds bitsandbytes-quantized weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def quantization_settings(model: nn.Module) -> dict[str, Any] | None:
    """The base's quantization config as JSON data (what a checkpoint records), or None when not quantized."""
    if not is_quantized(model):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return json.loads(base.config.quantization_config.to_json_string())


def prepare_quantized_base(model: nn.Module) -> nn.Module:
    """PEFT's k-bit training preparation; activation checkpointing stays the agent's own setting.

    bitsandbytes' CPU inference shortcut is switched off on every 4-bit layer: on a CPU with AVX512-BF16, a
    ``Linear4bit`` in eval mode that sees an input without grad repacks its weight, in place and for good, into a
    layout only its inference kernel reads. An agent alternates no-grad rollouts and reference passes with
    training forwards on the same layers; after a repack the training forward would take that kernel, which
    has no backward (no gradient reaches the adapters below it) and fails on the bias. The shortcut is
    decided per layer by this attribute, so turning it off keeps the autograd path in every mode.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def check_output_head_unquantized(model: nn.Module) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"The base model's {OUTPUT_HEAD} is quantized ({head.weight.dtype}); the fused log-prob op needs it in "
            f"full precision. Load the base with {OUTPUT_HEAD} in BitsAndBytesConfig(llm_int8_skip_modules=[...])."
        )


def merged_dequantized_model(actor: Any, adapter: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain (unquantized) copy of ``actor``'s base with ``adapter`` merged: every adapted layer's weight is
    dequantized, then its LoRA delta is added; other quantized layers are dequantized; the rest is copied."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
    from transformers import AutoModelForCausalLM

    base = actor.get_base_model()
    config = copy.deepcopy(base.config)
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    originals = base.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if ".base_layer" in name or "lora_" in name:
            continue  # parts of a LoRA layer, handled with it
        layer = module.get_base_layer() if isinstance(module, LoraLayer) else module
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or f"{name}.weight" not in plain.state_dict():
            continue
        if get_bnb_param_type(weight):
            full = dequantize_bnb_weight(weight, getattr(layer, "state", None)).to(torch.float32)
        else:
            full = weight.detach().to(torch.float32)
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            full = full + module.get_delta_weight(adapter).to(torch.float32)
        state[f"{name}.weight"] = full.to(dtype)
        if getattr(layer, "bias", None) is not None:
            state[f"{name}.bias"] = layer.bias.detach().to(dtype)
    for key in plain.state_dict():
        if key not in state:
            if key not in originals:
                raise RuntimeError(f"merged_dequantized_model: the quantized base has no weight for {key}.")
            state[key] = originals[key].detach().to(dtype)
    plain.load_state_dict(state, strict=True)
    return plain
