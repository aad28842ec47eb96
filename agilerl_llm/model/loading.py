"""The base network an agent is built on: a model the user passes, or one loaded by name (optionally quantized)."""

from __future__ import annotations

from typing import Any

from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from agilerl_llm.model.quantization import is_quantized


def load_network(
    actor_network: PreTrainedModel | PeftModel | None,
    model_name: str | None,
    model_config: dict[str, Any] | None,
    quantization_config: Any | None,
) -> PreTrainedModel | PeftModel:
    """``actor_network`` as given, or ``AutoModelForCausalLM.from_pretrained(model_name, **model_config)`` with
    ``quantization_config`` applied at load; exactly one of the two must be given."""
    if actor_network is not None and model_name is not None:
        raise ValueError("Pass either actor_network or model_name, not both.")
    if actor_network is not None:
        if quantization_config is not None and not is_quantized(actor_network):
            raise ValueError(
                "quantization_config applies when the base is loaded: pass model_name instead of actor_network, or "
                "load actor_network with from_pretrained(..., quantization_config=...) yourself."
            )
        return actor_network
    if model_name is None:
        raise ValueError("Pass actor_network (a HuggingFace causal LM) or model_name (a path for from_pretrained).")
    extra = {} if quantization_config is None else {"quantization_config": quantization_config}
    return AutoModelForCausalLM.from_pretrained(model_name, **(model_config or {}), **extra)
