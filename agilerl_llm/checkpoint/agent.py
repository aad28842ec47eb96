"""One agent's checkpoint: its adapters, hyperparameters and (optionally) optimizer state, in one folder.

Layout (``save_checkpoint``)::

    <path>/attributes.pt        always: plain data and tensors only, read back with torch.load(weights_only=True)
    <path>/actor|reference|critic/
        adapter_model.safetensors + adapter_config.json     when lora_only (PEFT's own adapter format)
    <path>/save_checkpoint/     DeepSpeed engine checkpoint, when DeepSpeed is attached and save_optimizer

The grid, per cell (lora_only x save_optimizer x plain | DeepSpeed):

=============  ==============  ==========================================  =========================================
lora_only      save_optimizer  plain (or Accelerate without DeepSpeed)     DeepSpeed
=============  ==============  ==========================================  =========================================
True           True            adapter folders; optimizer in attributes    adapter folders; engine checkpoint with
                                                                           frozen parameters excluded
True           False           adapter folders                             adapter folders
False          True            full actor state + optimizer in attributes  engine checkpoint, frozen params included
False          False           full actor state in attributes              gathered full actor state in attributes
=============  ==============  ==========================================  =========================================

The LR schedule's state travels in attributes.pt whenever save_optimizer is set (Accelerate keeps our schedule
outside DeepSpeed's engine).

Writes are atomic at the folder level: everything goes into a hidden sibling ``.<name>.incomplete`` which is
renamed to ``<path>`` once complete; an existing checkpoint at ``<path>`` is moved aside and deleted only after
that. Loads check everything they can (format, LoRA config, base-model shapes, every adapter file) before the
first live weight changes (file names, atomic folder writes and checked reads live in ``files.py``; this module
decides what a checkpoint holds and how it is applied; ``snapshot.py`` captures the same content in memory for
async saves). Under several processes every rank calls both functions; only the main process writes, and all ranks
wait for it.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from agilerl_llm.checkpoint import files
from agilerl_llm.checkpoint.files import (
    ADAPTER_WEIGHTS_FILE,
    ATTRIBUTES_FILE,
    ENGINE_DIR,
    FORMAT_VERSION,
    CheckpointError,
)
from agilerl_llm.model.adapters import ACTOR, CRITIC, REFERENCE
from agilerl_llm.optim import set_learning_rate

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm


# Attributes fixed by how the live agent was built; a checkpoint never changes them on load. ``index`` is the
# agent's place in its population, not part of what it learned.
_FIXED_ATTRIBUTES = frozenset(
    {"index", "use_separate_reference_adapter", "model_name", "gradient_checkpointing", "calc_position_embeddings"}
)


# ---------------------------------------------------------------------------------------------- public API
def save_checkpoint(
    agent: LLMAlgorithm, path: str | os.PathLike, lora_only: bool = True, save_optimizer: bool = True
) -> None:
    """Write ``agent`` to the folder ``path`` (replacing a previous checkpoint there only once complete).

    Args:
        lora_only: write the adapters as PEFT folders (``actor/`` ...); otherwise the full actor state, base
            weights included.
        save_optimizer: also write the optimizer and LR-schedule state so training can resume.
    """
    path = Path(path)
    dist = _Distribution(agent)
    staging = path.with_name(f".{path.name}.incomplete")
    files.check_target(path)  # on every rank, so that all of them raise rather than wait for each other
    if dist.is_main:
        files.remove_folder(staging)
        staging.mkdir(parents=True)
    dist.wait()
    try:
        engine_saves = dist.engine is not None and save_optimizer
        payload = _attributes_payload(agent, lora_only, save_optimizer, engine_saves)
        adapters = _adapter_weights(agent) if lora_only else {}
        if dist.is_main:
            files.save_torch(payload, staging / ATTRIBUTES_FILE)
            for name, weights in adapters.items():
                files.write_adapter(staging / name, weights, agent.lora_config)
        if engine_saves:
            dist.engine.save_checkpoint(str(staging / ENGINE_DIR), exclude_frozen_parameters=lora_only)
        dist.wait()
        if dist.is_main:
            files.publish(staging, path)
    except BaseException:
        if dist.is_main:
            files.remove_folder(staging)
        raise
    dist.wait()


def save_llm_checkpoint(agent: LLMAlgorithm, path: str | os.PathLike) -> None:
    """Save a deployable artefact: adapters only, no optimizer state.

    ``PeftModel.from_pretrained(base_model, f"{path}/actor")`` loads the trained policy.
    """
    save_checkpoint(agent, path, lora_only=True, save_optimizer=False)


def load_checkpoint(
    agent: LLMAlgorithm,
    path: str | os.PathLike,
    load_optimizer: bool = True,
    overwrite_reference_adapter: bool = False,
    overwrite_critic_adapter: bool = True,
) -> None:
    """Load a checkpoint written by ``save_checkpoint`` into ``agent`` (built on the same base model).

    Args:
        load_optimizer: restore the optimizer and LR schedule; a checkpoint without them warns and keeps the live ones.
            The saved hyperparameters (lr, beta, fitness, ...) are restored only onto an agent of the same class:
            loading another algorithm's checkpoint (a new pipeline stage) keeps the live agent's own.
        overwrite_reference_adapter: False (default) copies the loaded actor onto the reference, so the actor of
            stage N becomes the KL anchor of stage N+1 (SFT -> DPO -> GRPO). True restores the checkpoint's own
            reference adapter (an exact resume); a checkpoint without one falls back to the actor copy.
        overwrite_critic_adapter: True (default) overwrites the live critic with the checkpoint's critic, or with
            its actor when it has none. False leaves the live critic as it is.

    Raises:
        FileNotFoundError: ``path`` or a file the checkpoint needs is missing (the message names it).
        CheckpointError: a file is truncated, corrupt or holds pickled objects; or the checkpoint was made with
            another LoRA config or base model. Nothing live has changed when it is raised.
    """
    path = Path(path)
    dist = _Distribution(agent)
    saved = files.read_attributes(path)
    _check_base_shapes(saved["base_shapes"], agent)  # first: another base model also resolves LoRA targets differently
    files.check_lora_config(saved["lora_config"], agent.lora_config, path / ATTRIBUTES_FILE)
    plan = _LoadPlan.make(agent, saved, overwrite_reference_adapter, overwrite_critic_adapter)
    adapter_weights = {name: files.read_adapter(path / name, agent.lora_config) for name in plan.from_folders}
    full_state = saved.get("actor_state_dict")
    engine_dir = path / ENGINE_DIR
    weights_in_engine = saved["engine_checkpoint"] and not saved["lora_only"]
    use_engine = saved["engine_checkpoint"] and dist.engine is not None and (load_optimizer or weights_in_engine)
    if weights_in_engine and dist.engine is None:
        raise CheckpointError(
            f"{engine_dir} holds this checkpoint's weights in DeepSpeed's engine format; load it into an agent "
            "prepared with the same DeepSpeed setup (or save with lora_only=True / save_optimizer=False instead)."
        )
    if use_engine and not engine_dir.is_dir():
        raise FileNotFoundError(f"{engine_dir} is missing: attributes.pt says the DeepSpeed engine state is there.")
    _check_weights(agent, adapter_weights, full_state, plan, path)
    optimizer_state = saved.get("optimizer") if load_optimizer else None
    if optimizer_state is not None and dist.engine is None:
        _check_optimizer_state(agent, optimizer_state, path / ATTRIBUTES_FILE)

    # Everything is validated: from here on the live agent changes.
    if use_engine:
        _load_engine(dist.engine, engine_dir, strict=weights_in_engine, load_optimizer=load_optimizer)
    _apply_weights(agent, dist, adapter_weights, full_state, plan)
    optimizer_loaded = _load_optimizer(agent, dist, saved, load_optimizer, use_engine, path)
    if saved.get("algorithm") == type(agent).__name__:  # a resume; a new stage (SFT -> GRPO) keeps its own
        _restore_attributes(agent, saved["attributes"], keep_optimizer_lr=optimizer_loaded)
    dist.wait()


# ---------------------------------------------------------------------------------------------- distribution
class _Distribution:
    """Which process writes, how to wait for the others, and the DeepSpeed engine (None without DeepSpeed)."""

    def __init__(self, agent: LLMAlgorithm) -> None:
        self.accelerator = agent.accelerator
        self.engine = agent._deepspeed_engine()

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def refresh_master_weights(self) -> None:
        """After writing parameters directly, copy them into ZeRO's fp32 master partitions too."""
        optimizer = getattr(self.engine, "optimizer", None)
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()


@contextmanager
def _gathered(parameters: Iterable[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Full parameters inside the block under ZeRO-3 (re-partitioned on exit, with rank 0's edits); a no-op otherwise."""
    parameters = list(parameters)
    if not any(hasattr(p, "ds_id") for p in parameters):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None):
        yield


def _lora_parameters(agent: LLMAlgorithm) -> list[torch.nn.Parameter]:
    return [p for name in agent.adapter_names() for p in agent.adapters.parameters(name)]


# ---------------------------------------------------------------------------------------------- saving
def _attributes_payload(
    agent: LLMAlgorithm,
    lora_only: bool,
    save_optimizer: bool,
    engine_saves: bool,
    named: dict[str, torch.nn.Parameter] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "algorithm": type(agent).__name__,
        "attributes": agent.inspect_attributes(agent),
        "adapters": list(agent.adapter_names()),
        "lora_config": _plain_lora_config(agent.lora_config),
        "base_shapes": _base_shapes(agent, named),
        "lora_only": lora_only,
        "engine_checkpoint": engine_saves,
    }
    if not lora_only and not engine_saves:
        with _gathered(agent.actor.parameters()):
            payload["actor_state_dict"] = {k: v.detach().clone() for k, v in agent.actor.state_dict().items()}
    if save_optimizer:
        if not engine_saves:
            payload["optimizer"] = agent.optimizer.state_dict()
        payload["lr_scheduler"] = agent.lr_scheduler.state_dict() if agent.lr_scheduler is not None else None
    return payload


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


def _adapter_weights(agent: LLMAlgorithm) -> dict[str, dict[str, torch.Tensor]]:
    with _gathered(_lora_parameters(agent)):
        return {
            name: {k: v.detach().clone().contiguous() for k, v in agent.adapters.state_dict(name).items()}
            for name in agent.adapter_names()
        }


# ---------------------------------------------------------------------------------------------- reading and checks
# actor module -> (the parameter dict it was worked out from, [(plain name, base parameter)])
_BASE_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base_shapes(agent: LLMAlgorithm, named: dict[str, torch.nn.Parameter] | None = None) -> dict[str, list[int]]:
    """Shapes of the frozen base model's parameters (ZeRO-3 aware): the fingerprint of the base model.

    Names are those of the plain model: PEFT's wrappers (``base_layer``, ``original_module``) are dropped, so the
    fingerprint does not depend on which modules LoRA targets. With ``named`` (from ``_named_parameters``, cached)
    the name filtering is cached too; the shapes are read afresh every time.
    """
    cached = _BASE_PARAMETERS.get(agent.actor) if named is not None else None
    if cached is None or cached[0] is not named:
        base = [
            (name.replace(".base_layer.", ".").replace(".original_module.", "."), parameter)
            for name, parameter in (agent.actor.named_parameters() if named is None else named.items())
            if "lora_" not in name and ".modules_to_save." not in name
        ]
        cached = (named, base)
        if named is not None:
            _BASE_PARAMETERS[agent.actor] = cached
    return {plain: list(getattr(parameter, "ds_shape", parameter.shape)) for plain, parameter in cached[1]}


def _check_base_shapes(saved: dict[str, list[int]], agent: LLMAlgorithm) -> None:
    live = _base_shapes(agent)
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


class _LoadPlan(SimpleNamespace):
    """Where each live adapter's weights come from: a folder, the full state, the actor, or nowhere (kept)."""

    @classmethod
    def make(cls, agent: LLMAlgorithm, saved: dict[str, Any], overwrite_reference: bool, overwrite_critic: bool):
        live, stored = agent.adapter_names(), set(saved["adapters"])
        from_checkpoint = [ACTOR]  # adapters whose weights come from disk
        copy_from_actor = []
        if REFERENCE in live:
            (from_checkpoint if overwrite_reference and REFERENCE in stored else copy_from_actor).append(REFERENCE)
        if CRITIC in live and overwrite_critic:
            (from_checkpoint if CRITIC in stored else copy_from_actor).append(CRITIC)
        from_folders = from_checkpoint if saved["lora_only"] else []
        return cls(from_checkpoint=from_checkpoint, from_folders=from_folders, copy_from_actor=copy_from_actor)


def _check_weights(
    agent: LLMAlgorithm,
    adapter_weights: dict[str, dict[str, torch.Tensor]],
    full_state: dict[str, torch.Tensor] | None,
    plan: _LoadPlan,
    path: Path,
) -> None:
    """Every tensor to be loaded has a live counterpart of the same shape (checked before anything changes)."""
    with _gathered(_lora_parameters(agent)):
        expected = {
            name: {k: tuple(v.shape) for k, v in agent.adapters.state_dict(name).items()}
            for name in agent.adapter_names()
        }
    for name, weights in adapter_weights.items():
        files.compare_shapes(
            {k: tuple(v.shape) for k, v in weights.items()}, expected[name], path / name / ADAPTER_WEIGHTS_FILE
        )
    if full_state is None:
        return
    live_keys = set(agent.actor.state_dict())
    wanted = _full_state_subset(full_state, plan)
    missing = sorted(k for k in live_keys if _belongs(k, plan) and k not in wanted)
    if missing:
        raise CheckpointError(
            f"{path / ATTRIBUTES_FILE}: the saved actor state lacks {missing[:3]} (made for another model or adapter set)."
        )
    lora_shapes = {
        key.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}."): shape
        for name, shapes in expected.items()
        for key, shape in shapes.items()
    }
    for key, tensor in wanted.items():
        if key in lora_shapes and tuple(tensor.shape) != tuple(lora_shapes[key]):
            raise CheckpointError(
                f"{path / ATTRIBUTES_FILE}: {key!r} has shape {tuple(tensor.shape)} but the live model has "
                f"{tuple(lora_shapes[key])}: the checkpoint was made for another base model or LoRA rank."
            )


def _belongs(key: str, plan: _LoadPlan) -> bool:
    """Whether a full-state key is loaded from disk: base weights, and the adapters the plan takes from disk."""
    if "lora_" not in key:
        return True
    return any(f".{name}." in key for name in plan.from_checkpoint)


def _full_state_subset(full_state: dict[str, torch.Tensor], plan: _LoadPlan) -> dict[str, torch.Tensor]:
    return {k: v for k, v in full_state.items() if _belongs(k, plan)}


def _check_optimizer_state(agent: LLMAlgorithm, state: dict[str, Any], file: Path) -> None:
    saved_sizes = [len(group["params"]) for group in state.get("param_groups", [])]
    live_sizes = [len(group["params"]) for group in agent.optimizer.param_groups]
    if saved_sizes != live_sizes:
        raise CheckpointError(
            f"{file}: the saved optimizer state covers parameter groups of sizes {saved_sizes}, this agent's "
            f"optimizer has {live_sizes} (different trainable adapters). Pass load_optimizer=False to keep the "
            "live optimizer."
        )


# ---------------------------------------------------------------------------------------------- applying
def _load_engine(engine: Any, engine_dir: Path, strict: bool, load_optimizer: bool) -> None:
    load_path, _ = engine.load_checkpoint(
        str(engine_dir),
        load_module_strict=strict,
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine checkpoint in {engine_dir} (no 'latest' tag file).")


def _apply_weights(
    agent: LLMAlgorithm,
    dist: _Distribution,
    adapter_weights: dict[str, dict[str, torch.Tensor]],
    full_state: dict[str, torch.Tensor] | None,
    plan: _LoadPlan,
) -> None:
    parameters = list(agent.actor.parameters()) if full_state is not None else _lora_parameters(agent)
    with _gathered(parameters, modify=True):
        if full_state is not None:
            agent.actor.load_state_dict(_full_state_subset(full_state, plan), strict=False)
        for name, weights in adapter_weights.items():
            agent.adapters.load_state_dict(name, weights)
        for name in plan.copy_from_actor:
            agent.adapters.copy(ACTOR, name)
    dist.refresh_master_weights()


def _load_optimizer(
    agent: LLMAlgorithm, dist: _Distribution, saved: dict[str, Any], load_optimizer: bool, used_engine: bool, path: Path
) -> bool:
    """Restore optimizer and schedule state when asked and present; True when the optimizer state was restored."""
    if not load_optimizer:
        return False
    if dist.engine is not None:
        restored = used_engine
    elif saved.get("optimizer") is not None:
        agent.optimizer.load_state_dict(saved["optimizer"])
        restored = True
    else:
        restored = False
    if not restored:
        reason = (
            "it was saved with save_optimizer=False"
            if "lr_scheduler" not in saved
            else "its optimizer state is in a format this agent's optimizer cannot take (DeepSpeed vs plain)"
        )
        warnings.warn(
            f"load_optimizer=True but the checkpoint at {path} has no usable optimizer state ({reason}); keeping "
            "the live optimizer and LR schedule. Pass load_optimizer=False to silence this.",
            UserWarning,
            stacklevel=3,
        )
        return False
    if saved.get("lr_scheduler") is not None and agent.lr_scheduler is not None:
        agent.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    return True


def _restore_attributes(agent: LLMAlgorithm, attributes: dict[str, Any], keep_optimizer_lr: bool) -> None:
    """Set the saved hyperparameters back onto an agent of the same class (not those fixed at construction)."""
    live = agent.inspect_attributes(agent)
    for name, value in attributes.items():
        if name in live and name not in _FIXED_ATTRIBUTES:
            setattr(agent, name, value)
    # The agent's lr and its optimizer never disagree: a restored (e.g. evolved) lr reaches the live optimizer.
    if not keep_optimizer_lr and "lr" in attributes and attributes["lr"] != live.get("lr"):
        set_learning_rate(agent.optimizer, agent.lr)
