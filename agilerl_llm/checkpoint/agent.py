"""One agent's checkpoint: its adapters, hyperparameters and (optionally) optimizer state, in one folder.

Layout (``save_checkpoint``)::

    <path>/attributes.pt        always: plain data and tensors only, read back with torch.load(weights_only=True)
    <path>/actor|reference|critic/
        adapter_model.safetensors + adapter_config.json     when lora_only (PEFT's own adapter format)
    <path>/modules/<name>.safetensors   the agent's other trainable modules (PPO's value head), always
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

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from agilerl_llm.checkpoint import files
from agilerl_llm.checkpoint.files import ADAPTER_WEIGHTS_FILE, ATTRIBUTES_FILE, ENGINE_DIR, CheckpointError
from agilerl_llm.checkpoint.state import (
    AgentState,
    Distribution,
    check_base_fingerprint,
    check_base_shapes,
    forget_fingerprint,
    gathered,
    lora_parameters,
    read_state,
    write_state,
)
from agilerl_llm.model.adapters import ACTOR, CRITIC, REFERENCE
from agilerl_llm.optim import set_learning_rate
from agilerl_llm.utils import write_fence

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm


# Attributes fixed by how the live agent was built; a checkpoint never changes them on load. ``index`` is the
# agent's place in its population, not part of what it learned.
# How the live agent was built, not what it learned: a checkpoint made with vLLM rollouts loads into an agent that
# generates with HF (and the other way round) without switching its engine.
_FIXED_ATTRIBUTES = frozenset(
    {
        "index",
        "use_separate_reference_adapter",
        "model_name",
        "gradient_checkpointing",
        "calc_position_embeddings",
        "use_vllm",
        "use_memory_efficient_params",
        "torch_compiler",
        "lora_target_scope",
        "use_sequence_packing",
        "packs_sequences",
        "shares_prefixes",
        "use_liger_loss",
        "liger_model_patches",
    }
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
    dist = Distribution(agent)
    staging = path.with_name(f".{path.name}.incomplete")
    files.check_target(path)  # on every rank, so that all of them raise rather than wait for each other
    if dist.is_main:
        files.remove_folder(staging)
        staging.mkdir(parents=True)
    dist.wait()
    try:
        state = agent.checkpoint_state(lora_only=lora_only, save_optimizer=save_optimizer)
        if dist.is_main:
            write_state(state, staging)
        if state.payload["engine_checkpoint"]:
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
    check_base_model: bool = True,
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
            its actor when it has none. False leaves the live critic as it is. Extra modules that belong with the
            critic (PPO's value head) are loaded exactly when the critic is.
        check_base_model: refuse a LoRA checkpoint whose recorded base-model fingerprint differs from this agent's
            base (same shapes, other weights). False loads it anyway.

    Raises:
        FileNotFoundError: ``path`` or a file the checkpoint needs is missing (the message names it).
        CheckpointError: a file is truncated, corrupt or holds pickled objects; or the checkpoint was made with
            another LoRA config or base model. Nothing live has changed when it is raised.
    """
    state = read_state(Path(path), agent.lora_config)
    agent.load_checkpoint_state(
        state,
        load_optimizer=load_optimizer,
        overwrite_reference_adapter=overwrite_reference_adapter,
        overwrite_critic_adapter=overwrite_critic_adapter,
        check_base_model=check_base_model,
    )


def apply_state(
    agent: LLMAlgorithm,
    state: AgentState,
    load_optimizer: bool = True,
    overwrite_reference_adapter: bool = False,
    overwrite_critic_adapter: bool = True,
    check_base_model: bool = True,
) -> None:
    """Apply a checkpoint state (read from disk, or captured in memory) to ``agent``: the body of
    ``LLMAlgorithm.load_checkpoint_state``. Everything is checked before the first live weight changes."""
    write_fence.fence()  # an async run checkpoint may still be copying the live weights and optimizer state
    dist = Distribution(agent)
    saved = state.payload
    source = state.attributes_file
    check_base_shapes(saved["base_shapes"], agent)  # first: another base model also resolves LoRA targets differently
    files.check_lora_config(saved["lora_config"], agent.lora_config, source)
    if check_base_model and saved["lora_only"]:  # a full checkpoint brings its own base weights
        check_base_fingerprint(
            saved.get("base_fingerprint"), agent.actor, source, saved["attributes"].get("model_name")
        )
    plan = _LoadPlan.make(agent, saved, overwrite_reference_adapter, overwrite_critic_adapter)
    for name in plan.from_folders:
        if name not in state.adapters:
            raise FileNotFoundError(f"the {name!r} adapter is missing from the checkpoint ({source} lists it).")
        if name in state.adapter_configs:
            config_file = state.source / name / files.ADAPTER_CONFIG_FILE if state.source else source
            files.check_lora_config(state.adapter_configs[name], agent.lora_config, config_file)
    adapter_weights = {name: state.adapters[name] for name in plan.from_folders}
    modules = _modules_to_load(agent, state, plan)
    full_state = saved.get("actor_state_dict")
    engine_dir = state.engine_dir
    weights_in_engine = saved["engine_checkpoint"] and not saved["lora_only"]
    use_engine = saved["engine_checkpoint"] and dist.engine is not None and (load_optimizer or weights_in_engine)
    if weights_in_engine and dist.engine is None:
        raise CheckpointError(
            f"{engine_dir} holds this checkpoint's weights in DeepSpeed's engine format; load it into an agent "
            "prepared with the same DeepSpeed setup (or save with lora_only=True / save_optimizer=False instead)."
        )
    if use_engine and (engine_dir is None or not engine_dir.is_dir()):
        raise FileNotFoundError(f"{engine_dir} is missing: {source} says the DeepSpeed engine state is there.")
    _check_weights(agent, adapter_weights, full_state, plan, state.source or Path("<memory>"))
    optimizer_state = saved.get("optimizer") if load_optimizer else None
    if optimizer_state is not None and dist.engine is None:
        _check_optimizer_state(agent, optimizer_state, source)
    same_algorithm = saved.get("algorithm") == type(agent).__name__  # a resume; a new stage keeps its own
    if same_algorithm:
        live = agent.inspect_attributes(agent)
        restored = {k: v for k, v in saved["attributes"].items() if k in live and k not in _FIXED_ATTRIBUTES}
        _validate_attributes(agent, live | restored, source)

    # Everything is validated: from here on the live agent changes.
    if use_engine:
        _load_engine(dist.engine, engine_dir, strict=weights_in_engine, load_optimizer=load_optimizer)
    _apply_weights(agent, dist, adapter_weights, full_state, plan)
    _apply_modules(agent, modules)
    optimizer_loaded = _load_optimizer(agent, dist, saved, load_optimizer, use_engine, state.source or source)
    if same_algorithm:
        _restore_attributes(agent, restored, keep_optimizer_lr=optimizer_loaded)
    dist.wait()


# ---------------------------------------------------------------------------------------------- checks
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
    with gathered(lora_parameters(agent)):
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


def _check_optimizer_state(agent: LLMAlgorithm, state: dict[str, Any], file: Any) -> None:
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
    dist: Distribution,
    adapter_weights: dict[str, dict[str, torch.Tensor]],
    full_state: dict[str, torch.Tensor] | None,
    plan: _LoadPlan,
) -> None:
    parameters = list(agent.actor.parameters()) if full_state is not None else lora_parameters(agent)
    with gathered(parameters, modify=True):
        if full_state is not None:
            for name in plan.from_checkpoint:
                agent.adapters.own(name)  # written in place below: never into a tensor another member holds
            agent.actor.load_state_dict(_full_state_subset(full_state, plan), strict=False)
            forget_fingerprint(agent.actor)  # the base weights may have changed
        for name, weights in adapter_weights.items():
            agent.adapters.load_state_dict(name, weights)
        for name in plan.copy_from_actor:
            agent.adapters.copy(ACTOR, name)
    dist.refresh_master_weights()


def _load_optimizer(
    agent: LLMAlgorithm, dist: Distribution, saved: dict[str, Any], load_optimizer: bool, used_engine: bool, path: Any
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


def _validate_attributes(agent: LLMAlgorithm, candidate: dict[str, Any], source: str) -> None:
    """The hyperparameters after the load must pass the constructor's own checks (a hand-edited or damaged
    attributes.pt must not, say, train by gradient ascent with lr < 0)."""
    try:
        agent.validate_hyperparameters(candidate)
    except (ValueError, ValidationError) as error:
        raise CheckpointError(
            f"{source} holds hyperparameters this agent rejects: {_first_error(error)}. Nothing was loaded; fix or "
            "re-save the checkpoint (or load it with load_checkpoint into a fresh agent of another class)."
        ) from None


def _first_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}={first.get('input')!r}: {first['msg']}"
    return str(error)


def _restore_attributes(agent: LLMAlgorithm, restored: dict[str, Any], keep_optimizer_lr: bool) -> None:
    """Set the saved hyperparameters back onto an agent of the same class."""
    live_lr = agent.lr
    for name, value in restored.items():
        setattr(agent, name, value)
    # The agent's lr and its optimizer never disagree: a restored (e.g. evolved) lr reaches the live optimizer.
    if not keep_optimizer_lr and "lr" in restored and restored["lr"] != live_lr:
        set_learning_rate(agent.optimizer, agent.lr)


# ---------------------------------------------------------------------------------------------- extra modules
def _modules_to_load(agent: LLMAlgorithm, state: AgentState, plan: _LoadPlan) -> dict[str, dict[str, torch.Tensor]]:
    """The saved extra modules that this load applies (a module that follows an adapter comes with it), each
    checked against the live module's keys and shapes."""
    live = agent.checkpoint_modules()
    chosen = {}
    for name, spec in live.items():
        if name not in state.modules:
            continue  # e.g. a GRPO checkpoint loaded into PPO: the live value head stays
        if spec.follows_adapter is not None and spec.follows_adapter not in plan.from_checkpoint:
            continue  # that adapter is kept or copied from the actor, not loaded: the module stays too
        expected = {k: tuple(v.shape) for k, v in spec.module.state_dict().items()}
        where = state.source / files.MODULES_DIR / f"{name}.safetensors" if state.source else Path(f"<memory>/{name}")
        files.compare_shapes({k: tuple(v.shape) for k, v in state.modules[name].items()}, expected, where)
        chosen[name] = state.modules[name]
    return chosen


@torch.no_grad()
def _apply_modules(agent: LLMAlgorithm, modules: dict[str, dict[str, torch.Tensor]]) -> None:
    live = agent.checkpoint_modules()
    for name, tensors in modules.items():
        module = live[name].module
        with gathered(module.parameters(), modify=True):  # ZeRO-3: write the full tensors, re-partitioned on exit
            current = module.state_dict()
            module.load_state_dict({k: v.to(current[k].device, current[k].dtype) for k, v in tensors.items()})
    if modules:
        Distribution(agent).refresh_master_weights()
