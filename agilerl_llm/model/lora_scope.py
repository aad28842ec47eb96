"""Scoping LoRA to one sub-model of a composite network (``lora_target_scope``).

A multimodal model holds several sub-models (a vision tower, a projector, a language model) whose linear
layers share names such as ``q_proj``. ``target_modules="all-linear"`` or ``["q_proj", "v_proj"]`` would
adapt all of them; a scope such as ``"language_model"`` keeps only the modules whose dotted path contains
that segment sequence.

The scoped config names its targets with a regular expression (PEFT full-matches a string
``target_modules`` against each module path). It is built from the scope and the targets' last names and
checked to select exactly the scoped modules; where that shorter form would catch more, every path is
listed. Applying the same scope to an already scoped config gives the same config, so a checkpoint's
config can be scoped again when an agent is rebuilt from it.
"""

from __future__ import annotations

import copy
import re

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists


def adapt_lora_config_for_model(
    lora_config: LoraConfig, model: torch.nn.Module, target_scope: str | None
) -> LoraConfig:
    """A copy of ``lora_config`` whose targets are the modules it selects under ``target_scope``.

    Args:
        lora_config: the LoRA settings (``target_modules`` a list of names, a regex string or "all-linear").
        model: the base model the adapters will be attached to (not yet a PeftModel).
        target_scope: a dotted path segment, e.g. "language_model" or "model.language_model"; None returns
            ``lora_config`` unchanged.

    Raises:
        ValueError: naming ``lora_target_scope`` when the scope is malformed, is not a sub-module path of the
            model, or holds none of the modules ``lora_config.target_modules`` selects.
    """
    if target_scope is None:
        return lora_config
    if not isinstance(target_scope, str) or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", target_scope):
        raise ValueError(
            f"lora_target_scope={target_scope!r} must be a dotted module path such as 'language_model', or None."
        )
    module_names = [name for name, _ in model.named_modules() if name]
    if not any(_is_or_under(name, target_scope) for name in module_names):
        raise ValueError(
            f"lora_target_scope={target_scope!r} is not a sub-module path of {type(model).__name__}; its "
            f"sub-models are {_sub_model_paths(model)}."
        )
    targeted = _targeted_module_names(lora_config, model)
    scoped = [name for name in targeted if _inside(name, target_scope)]
    if not scoped:
        raise ValueError(
            f"lora_target_scope={target_scope!r} holds none of the modules lora_config.target_modules="
            f"{lora_config.target_modules!r} selects (they are under {_top_levels(targeted)}); change the scope "
            "or name the scope's layers in target_modules."
        )
    scoped_config = copy.deepcopy(lora_config)
    scoped_config.target_modules = _pattern_selecting(scoped, target_scope, module_names)
    return scoped_config


def _is_or_under(module_name: str, target_scope: str) -> bool:
    return f".{target_scope}." in f".{module_name}."


def _inside(module_name: str, target_scope: str) -> bool:
    """True for a module strictly inside the scope (the scope's segments, then at least one more)."""
    return f".{target_scope}." in f".{module_name}"


def _targeted_module_names(lora_config: LoraConfig, model: torch.nn.Module) -> list[str]:
    """Paths of the modules ``lora_config`` adapts on ``model``, by PEFT's own matching rules."""
    if lora_config.target_modules == "all-linear":
        output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output_head
        ]
    return [name for name, _ in model.named_modules() if name and check_target_module_exists(lora_config, name)]


def _pattern_selecting(scoped: list[str], target_scope: str, module_names: list[str]) -> str:
    """A regex PEFT full-matches against exactly the paths in ``scoped`` and no other module of the model."""
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in scoped})
    short = rf"(.*\.)?{re.escape(target_scope)}\.(.*\.)?({'|'.join(map(re.escape, leaf_names))})"
    if {name for name in module_names if re.fullmatch(short, name)} == set(scoped):
        return short
    return "|".join(re.escape(name) for name in sorted(scoped))


def _sub_model_paths(model: torch.nn.Module) -> list[str]:
    """Module paths two levels deep, the places a scope usually points at."""
    return [name for name, _ in model.named_modules() if name and name.count(".") <= 1]


def _top_levels(names: list[str]) -> list[str]:
    return sorted({".".join(name.split(".")[:2]) for name in names})
