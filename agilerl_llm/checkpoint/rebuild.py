"""``GRPO.load(path)``: a working agent rebuilt from an agent checkpoint folder alone.

The folder's ``attributes.pt`` records the algorithm, its constructor settings, the LoRA config, the LR schedule and
the base model's name or path (``base_model``). The agent is constructed on that base with those settings, then
the checkpoint is loaded onto it as an exact resume: actor, reference and critic adapters, extra modules,
optimizer and schedule as saved. The evolution ranges (``hp_config``) are run settings, not agent state: pass them
to the population, not through the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft import LoraConfig

from agilerl_llm.algorithms.evolvable import constructor_argument_names
from agilerl_llm.checkpoint import files
from agilerl_llm.checkpoint.files import CheckpointError

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm

# Constructor arguments a checkpoint never supplies: they say where and how to build, not what the agent is.
_NOT_FROM_CHECKPOINT = frozenset(
    {
        "self",
        "model_name",
        "actor_network",
        "accelerator",
        "device",
        "wrap",
        "clone",
        "hp_config",
        "lora_config",
        "quantization_config",
    }
)


def load_agent(
    cls: type[LLMAlgorithm], path: str | os.PathLike, device: Any = "cpu", accelerator: Any | None = None
) -> LLMAlgorithm:
    """The agent saved at ``path``, of class ``cls`` (or the subclass it was saved as), on ``device``.

    Raises:
        FileNotFoundError: ``path`` or one of its files is missing.
        CheckpointError: the folder holds another algorithm, records no base model, or its base model cannot be
            loaded (each message names what is missing and what to do).
    """
    folder = Path(path)
    payload = files.read_attributes(folder)
    saved_cls = _saved_class(cls, payload.get("algorithm"), folder)
    base = payload.get("base_model")
    if not base:
        raise CheckpointError(
            f"{folder} records no base model (it was saved from an agent built on an in-memory model, or by an "
            f"older release), so {cls.__name__}.load cannot rebuild it. Build the agent on its base model and call "
            "agent.load_checkpoint(path)."
        )
    settings = {
        name: value
        for name, value in payload["attributes"].items()
        if name in constructor_argument_names(saved_cls) - _NOT_FROM_CHECKPOINT
    }
    settings["lora_config"] = _lora_config(payload["lora_config"])
    settings["cosine_lr_schedule_config"] = payload.get("lr_schedule_config")
    if payload.get("quantization_config"):
        from transformers import BitsAndBytesConfig

        settings["quantization_config"] = BitsAndBytesConfig.from_dict(payload["quantization_config"])
    try:
        agent = saved_cls(model_name=base, accelerator=accelerator, device=str(device), **settings)
    except OSError as error:
        raise CheckpointError(
            f"The base model {base!r} recorded in {folder}/{files.ATTRIBUTES_FILE} cannot be loaded ({error}). "
            "Restore it at that path, or build the agent on a copy of it and call agent.load_checkpoint(path)."
        ) from None
    saved_optimizer = "optimizer" in payload or payload.get("engine_checkpoint", False)
    agent.load_checkpoint(
        str(folder),
        load_optimizer=bool(saved_optimizer),
        overwrite_reference_adapter=True,
        overwrite_critic_adapter=True,
    )
    return agent


def _saved_class(cls: type[LLMAlgorithm], name: Any, folder: Path) -> type[LLMAlgorithm]:
    from agilerl_llm import algorithms

    saved = getattr(algorithms, str(name), None)
    if not (isinstance(saved, type) and issubclass(saved, cls)):
        raise CheckpointError(
            f"{folder} holds a {name} checkpoint, which {cls.__name__}.load cannot rebuild; use {name}.load(path)."
        )
    return saved


def _lora_config(plain: dict[str, Any]) -> LoraConfig:
    fields = {field.name for field in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{name: value for name, value in plain.items() if name in fields})
