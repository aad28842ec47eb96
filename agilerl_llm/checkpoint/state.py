"""The agent checkpoint contract: what one agent is made of, captured in memory, written to and read from a folder.

Every path that saves or loads an agent goes through this one contract (``LLMAlgorithm.checkpoint_state`` and
``LLMAlgorithm.load_checkpoint_state``): the agent grid (``agent.py``), the run manager and its async snapshots
(``run.py``), ``clone()`` and the exports. An ``AgentState`` holds

* ``payload``: what ``attributes.pt`` holds: plain hyperparameters, the LoRA config, the base model's shapes and
  fingerprint, optimizer and LR-schedule state (plain data and tensors only, read with ``weights_only=True``);
* ``adapters``: each LoRA adapter's weights under PEFT's keys (``<name>/adapter_model.safetensors``);
* ``modules``: the agent's other trainable modules, e.g. PPO's value head (``modules/<name>.safetensors``).

What the agent is made of is the agent's to say (``LLMAlgorithm.adapter_names`` and ``checkpoint_modules``); this
module never reaches into an algorithm's private attributes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agilerl_llm.checkpoint import files
from agilerl_llm.checkpoint.files import ATTRIBUTES_FILE, FORMAT_VERSION, MODULES_DIR, CheckpointError
from agilerl_llm.distributed import gathered, is_partitioned
from agilerl_llm.model.quantization import quantization_settings

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm
    from agilerl_llm.checkpoint.snapshot import HostCopier


@dataclass(frozen=True)
class CheckpointModule:
    """A trainable module an agent keeps besides its LoRA adapters (PPO's value head).

    Attributes:
        module: the live module; its ``state_dict()`` is saved as ``modules/<name>.safetensors``.
        follows_adapter: the adapter this module belongs with (the value head with the critic): it is loaded
            exactly when that adapter's weights are loaded from the checkpoint, and kept otherwise. None: always
            loaded when the checkpoint has it.
    """

    module: torch.nn.Module
    follows_adapter: str | None = None


@dataclass
class AgentState:
    """One agent checkpoint in memory (see the module docstring). ``source`` is the folder it was read from, for
    error messages; ``engine_dir`` its DeepSpeed engine folder, when it has one."""

    payload: dict[str, Any]
    adapters: dict[str, dict[str, torch.Tensor]]
    lora_config: Any
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    adapter_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # read from disk: to be checked
    source: Path | None = None
    engine_dir: Path | None = None

    @property
    def attributes_file(self) -> str:
        return str(self.source / ATTRIBUTES_FILE) if self.source is not None else "the in-memory checkpoint state"


# ---------------------------------------------------------------------------------------------- distribution
class Distribution:
    """What the checkpoint code needs of an agent's ``Distributed`` (distributed.py): which process writes, how
    to wait for the others, and the DeepSpeed engine (None without DeepSpeed)."""

    def __init__(self, agent: LLMAlgorithm) -> None:
        self.dist = agent.dist
        self.accelerator = agent.accelerator
        self.engine = agent.engine

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def wait(self) -> None:
        self.dist.barrier()

    def refresh_master_weights(self) -> None:
        """After writing parameters directly, copy them into ZeRO's fp32 master partitions too."""
        self.dist.refresh_master_weights(self.engine)


def lora_parameters(agent: LLMAlgorithm) -> list[torch.nn.Parameter]:
    return [p for name in agent.adapter_names() for p in agent.adapters.parameters(name)]


# ---------------------------------------------------------------------------------------------- capturing
def capture_state(
    agent: LLMAlgorithm,
    lora_only: bool = True,
    save_optimizer: bool = True,
    to_host: bool = False,
    reuse: AgentState | None = None,
    copier: HostCopier | None = None,
) -> AgentState:
    """What a checkpoint of ``agent`` holds, in memory (every rank calls it: under ZeRO-3 it gathers).

    Args:
        lora_only: adapters as separate weights; otherwise the full actor state (base included) in the payload.
        save_optimizer: include optimizer and LR-schedule state. With a DeepSpeed engine the engine writes the
            optimizer state itself (``save_checkpoint``), so the payload records that instead.
        to_host: copy every tensor (and container) to CPU memory, so the state stays fixed while training goes on
            (async saves, clones). Not possible with a DeepSpeed engine that holds the optimizer state.
        reuse: an earlier host state whose tensors may be overwritten to hold this one: each tensor of the same
            place, shape, dtype and strides is filled with ``copy_`` instead of a fresh allocation; anything else
            is copied fresh. The earlier state is clobbered: pass one only when nothing reads it any more.
        copier: with ``to_host``, queue the copies into reused tensors here instead of doing them before returning;
            the state is not complete until the caller flushes the copier (or runs a ``DeferredCopy`` of it).
    """
    from agilerl_llm.checkpoint.snapshot import HostCopier, adapter_weights_fast, host_copy
    from agilerl_llm.model.module_tree import named_parameters

    dist = Distribution(agent)
    engine_saves = dist.engine is not None and save_optimizer
    if engine_saves and to_host:
        raise ValueError("a DeepSpeed engine writes its optimizer state itself; use save_checkpoint instead.")
    named = named_parameters(agent.actor)  # base shapes and adapter weights, without a module walk per save
    payload = _payload(agent, lora_only, save_optimizer, engine_saves, named)
    reuse = reuse if to_host else None
    own_copier = copier is None or not to_host
    copier = HostCopier() if own_copier else copier  # copies into the reused tensors, all at once at the end
    adapters: dict[str, dict[str, torch.Tensor]] | None = {}
    if lora_only:
        adapters = adapter_weights_fast(agent, named, reuse.adapters if reuse is not None else None, copier)
        if adapters is None:  # ZeRO-3 or unusual PEFT keys: PEFT's own state-dict walk
            adapters = _adapter_weights(agent)
            if to_host:
                adapters = {name: {k: v.to("cpu") for k, v in weights.items()} for name, weights in adapters.items()}
    modules = {}
    for name, spec in agent.checkpoint_modules().items():
        with gathered(spec.module.parameters()):  # ZeRO-3 partitions the value head too
            modules[name] = {k: v.detach().clone() for k, v in spec.module.state_dict().items()}
    if to_host:
        payload = host_copy(payload, reuse.payload if reuse is not None else None, copier)
        modules = host_copy(modules, reuse.modules if reuse is not None else None, copier)
    else:
        modules = {name: {k: v.clone().contiguous() for k, v in tensors.items()} for name, tensors in modules.items()}
    if own_copier:
        copier.flush()
    # The live LoRA config, not a copy: it never changes after the agent is built, and copying its target_modules
    # set could reorder it, so adapter_config.json would differ from a synchronous save's.
    return AgentState(payload=payload, adapters=adapters, lora_config=agent.lora_config, modules=modules)


def _payload(
    agent: LLMAlgorithm,
    lora_only: bool,
    save_optimizer: bool,
    engine_saves: bool,
    named: dict[str, torch.nn.Parameter] | None = None,
) -> dict[str, Any]:
    schedule = agent.cosine_lr_schedule_config
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "algorithm": type(agent).__name__,
        "attributes": agent.inspect_attributes(agent),
        "adapters": list(agent.adapter_names()),
        "modules": {name: spec.follows_adapter for name, spec in agent.checkpoint_modules().items()},
        "lora_config": _plain_lora_config(agent.lora_config),
        "base_shapes": base_shapes(agent, named),
        "base_fingerprint": base_fingerprint(agent.actor),
        "base_model": base_model_reference(agent),
        "quantization_config": quantization_settings(agent.actor),
        "lr_schedule_config": None if schedule is None else schedule.model_dump(),
        "lora_only": lora_only,
        "engine_checkpoint": engine_saves,
    }
    if not lora_only and not engine_saves:
        with gathered(agent.actor.parameters()):
            payload["actor_state_dict"] = {k: v.detach().clone() for k, v in agent.actor.state_dict().items()}
    if save_optimizer:
        if not engine_saves:
            payload["optimizer"] = agent.optimizer.state_dict()
        payload["lr_scheduler"] = agent.lr_scheduler.state_dict() if agent.lr_scheduler is not None else None
    return payload


def base_model_reference(agent: LLMAlgorithm) -> str | None:
    """What ``from_pretrained`` rebuilds this agent's base from: its ``model_name``, else the name or path the
    base model was loaded from; None for a model built in memory (``GRPO.load`` then cannot rebuild it)."""
    if agent.model_name:
        return str(agent.model_name)
    return getattr(agent.actor.get_base_model().config, "_name_or_path", None) or None


def _adapter_weights(agent: LLMAlgorithm) -> dict[str, dict[str, torch.Tensor]]:
    with gathered(lora_parameters(agent)):
        return {
            name: {k: v.detach().clone().contiguous() for k, v in agent.adapters.state_dict(name).items()}
            for name in agent.adapter_names()
        }


# id(config) -> (config, a deep copy of its attributes, JSON of files.plain_lora_config(config)); the newest few.
# Holding the config keeps its id from being reused while it is cached.
_PLAIN_LORA_CONFIGS: OrderedDict[int, tuple[Any, dict[str, Any], str]] = OrderedDict()


def _plain_lora_config(config: Any) -> dict[str, Any]:
    """``files.plain_lora_config(config)``, a fresh copy each call; converted again (PEFT's ``to_dict`` is a
    dataclass walk, a good part of a millisecond) only when the config's attributes differ from the last time."""
    attributes = getattr(config, "__dict__", None)
    if attributes is None:
        return files.plain_lora_config(config)
    cached = _PLAIN_LORA_CONFIGS.get(id(config))
    if cached is None or cached[0] is not config or cached[1] != attributes:
        cached = (config, copy.deepcopy(attributes), json.dumps(files.plain_lora_config(config)))
        _PLAIN_LORA_CONFIGS[id(config)] = cached
        while len(_PLAIN_LORA_CONFIGS) > 16:
            _PLAIN_LORA_CONFIGS.popitem(last=False)
    _PLAIN_LORA_CONFIGS.move_to_end(id(config))
    return json.loads(cached[2])  # JSON data survives the round trip unchanged


# ---------------------------------------------------------------------------------------------- the base model
def plain_base_name(name: str) -> str:
    """A base parameter's name as the plain HuggingFace model has it (PEFT's wrappers and prefix removed), so a PEFT
    model and the bare model it wraps give the same names."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def _base_parameters(named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (plain_base_name(name), parameter)
        for name, parameter in named
        if "lora_" not in name and ".modules_to_save." not in name
    ]


# actor module -> (the parameter dict it was worked out from, [(plain name, base parameter)])
_BASE_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def base_shapes(agent: LLMAlgorithm, named: dict[str, torch.nn.Parameter] | None = None) -> dict[str, list[int]]:
    """Shapes of the frozen base model's parameters (ZeRO-3 aware), by plain name (``plain_base_name``). With
    ``named`` (from ``snapshot.named_parameters``, cached) the name filtering is cached too."""
    cached = _BASE_PARAMETERS.get(agent.actor) if named is not None else None
    if cached is None or cached[0] is not named:
        base = _base_parameters(agent.actor.named_parameters() if named is None else named.items())
        cached = (named, base)
        if named is not None:
            _BASE_PARAMETERS[agent.actor] = cached
    return {
        plain: list(parameter.ds_shape if is_partitioned(parameter) else parameter.shape)
        for plain, parameter in cached[1]
    }


def check_base_shapes(saved: dict[str, list[int]], agent: LLMAlgorithm) -> None:
    live = base_shapes(agent)
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    mismatched = [name for name in sorted(set(saved) & set(live)) if saved[name] != live[name]]
    if missing or unexpected or mismatched:
        detail = (
            f"parameter {mismatched[0]!r} has shape {saved[mismatched[0]]} in the checkpoint but {live[mismatched[0]]} "
            "here"
            if mismatched
            else f"parameters missing from the checkpoint {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise CheckpointError(
            f"The checkpoint was made for a different base model: {detail}. Build the agent on the base model the "
            "checkpoint was trained from, then load."
        )


# module -> fingerprint; invalidated by ``forget_fingerprint`` when a load rewrites base weights
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FINGERPRINT_TENSORS = 4
_FINGERPRINT_VALUES = 4096


def base_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the frozen base weights: the first values of a few base tensors spread over the model.

    Two bases of one architecture (same shapes) but different weights get different fingerprints, so an adapter
    is never silently loaded onto the wrong base. Values are hashed after rounding to bfloat16, so the same base
    loaded in float32 or bfloat16 gives the same fingerprint; non-float (quantised) tensors are skipped. Under
    ZeRO-3 the few tensors are gathered (a collective: every rank calls this). Cached per model: the base is
    frozen; a load that writes base weights calls ``forget_fingerprint``.
    """
    cached = _FINGERPRINTS.get(model)
    if cached is not None:
        return cached
    candidates = sorted(
        (name, parameter)
        for name, parameter in _base_parameters(model.named_parameters())
        if parameter.is_floating_point()
        and (parameter.ds_numel if is_partitioned(parameter) else parameter.numel()) > 0
    )
    if not candidates:
        return ""
    count = min(_FINGERPRINT_TENSORS, len(candidates))
    picked = [candidates[round(i * (len(candidates) - 1) / max(count - 1, 1))] for i in range(count)]
    digest = hashlib.sha256()
    with gathered([parameter for _, parameter in picked]):
        for name, parameter in picked:
            values = parameter.detach().reshape(-1)[:_FINGERPRINT_VALUES].to("cpu", torch.bfloat16)
            digest.update(name.encode())
            digest.update(values.view(torch.int16).numpy().tobytes())
    fingerprint = digest.hexdigest()[:16]
    _FINGERPRINTS[model] = fingerprint
    return fingerprint


def forget_fingerprint(model: torch.nn.Module) -> None:
    _FINGERPRINTS.pop(model, None)


def check_base_fingerprint(saved: str | None, model: torch.nn.Module, source: str, model_name: Any = None) -> None:
    """Refuse a checkpoint whose base-model fingerprint differs from ``model``'s (checkpoints without one pass)."""
    if not saved:
        return
    live = base_fingerprint(model)
    if live and live != saved:
        trained_on = f" (it records model_name={model_name!r})" if model_name else ""
        raise CheckpointError(
            f"{source}: the checkpoint was trained on another base model{trained_on}: the shapes match but the base "
            f"weights differ (fingerprint {saved} in the checkpoint, {live} here). Build the agent on the base model "
            "the checkpoint was trained from, or pass check_base_model=False to load it onto this base anyway."
        )


# ---------------------------------------------------------------------------------------------- disk
def write_state(state: AgentState, folder: Path) -> None:
    """Write ``state`` into the new folder ``folder`` (main process only; plain file I/O, thread safe). Every file
    is fsynced; publishing the folder (``files.publish``) is the caller's."""
    folder.mkdir(parents=True, exist_ok=True)
    files.save_torch(state.payload, folder / ATTRIBUTES_FILE)
    for name, weights in state.adapters.items():
        files.write_adapter(folder / name, weights, state.lora_config)
    if state.modules:
        (folder / MODULES_DIR).mkdir()
        for name, tensors in state.modules.items():
            files.write_tensors(folder / MODULES_DIR / f"{name}.safetensors", tensors)


def read_state(folder: Path, live_lora_config: Any) -> AgentState:
    """Read an agent checkpoint folder; every file is checked for readability and a bad one is named (whether it
    fits an agent is ``load_checkpoint_state``'s check). Adapters come back for a ``lora_only`` checkpoint,
    modules whenever the checkpoint has them."""
    payload = files.read_attributes(folder)
    adapters, adapter_configs = {}, {}
    for name in payload.get("adapters", []) if payload["lora_only"] else []:
        adapter_configs[name], adapters[name] = files.read_adapter(folder / name)
    modules = {name: files.read_tensors(folder / MODULES_DIR / f"{name}.safetensors") for name in payload["modules"]}
    engine_dir = folder / files.ENGINE_DIR if payload["engine_checkpoint"] else None
    return AgentState(
        payload=payload,
        adapters=adapters,
        lora_config=live_lora_config,
        modules=modules,
        adapter_configs=adapter_configs,
        source=folder,
        engine_dir=engine_dir,
    )
