"""``EvolvableMixin``: what makes an LLM agent a member of an evolving population, with the spec's names.

Cloning (a deep copy of the hyperparameters sharing the frozen base), the population constructor, attribute
inspection, mutation hooks and the last mutation (``mut``), learning-rate updates, optimizer re-initialisation,
``torch.compile`` of the training forward (``recompile``), and the spec's network-introspection methods. The
networks and optimizer themselves are built by ``LLMAlgorithm`` (base.py); this module only copies, inspects and
rewires them.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from agilerl_llm.algorithms.arguments import is_plain
from agilerl_llm.optim import CosineLRScheduleConfig, as_schedule_config, build_lr_scheduler, set_learning_rate

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm
    from agilerl_llm.evolution.hyperparameters import HyperparameterConfig

# Attributes that hold collaborators (networks, optimizer, accelerator, hooks), not hyperparameters.
COLLABORATORS = frozenset(
    {
        "adapters",
        "actor",
        "policy_forward",
        "optimizer",
        "lr_scheduler",
        "accelerator",
        "dist",
        "engine",
        "mutation_hooks",
        "hp_config",
        "rollout_engine",
    }
)

# torch.compile's modes (``torch_compiler``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"torch_compiler={mode!r} is not a torch.compile mode; choose one of {COMPILE_MODES} or None.")


class EvolvableMixin:
    """Population membership for ``LLMAlgorithm`` (see the module docstring)."""

    # ------------------------------------------------------------------------------------------ identity
    @property
    def index(self) -> int:
        """The agent's id in its population."""
        return self._index

    @index.setter
    def index(self, value: int) -> None:
        self._index = value

    @property
    def mut(self) -> Any:
        """What the last mutation did to this agent: the mutated hyperparameter's name, or "None"."""
        return self.__dict__.get("_mut")

    @mut.setter
    def mut(self, value: Any) -> None:
        self._mut = value

    # ------------------------------------------------------------------------------------------ hooks
    def register_mutation_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after every mutation of this agent (and of its clones)."""
        self.mutation_hooks.append(hook)

    def mutation_hook(self) -> None:
        """Run the registered mutation hooks."""
        for hook in self.mutation_hooks:
            hook()

    # ------------------------------------------------------------------------------------------ networks
    def evolvable_attributes(self, networks_only: bool = False) -> dict[str, Any]:
        """The agent's trainable networks by attribute name (the PEFT ``actor`` and any extra trainable module,
        PPO's value head), and unless ``networks_only`` the ``optimizer`` over them."""
        attributes: dict[str, Any] = {"actor": self.actor}
        attributes |= {name: spec.module for name, spec in self.checkpoint_modules().items()}
        if not networks_only:
            attributes["optimizer"] = self.optimizer
        return attributes

    def register_network_group(self, group: Any) -> None:
        """Record a network group (an object with ``eval_network``, a network attribute's name or the network).

        An LLM agent's networks are fixed by its algorithm (``evolvable_attributes``); registering names which of
        them a group evaluates and is checked against them. The names are kept in ``network_groups``.
        """
        if not hasattr(group, "eval_network"):
            raise TypeError(f"register_network_group needs an object with an eval_network; got {type(group).__name__}.")
        networks = self.evolvable_attributes(networks_only=True)
        target = group.eval_network
        names = [name for name, network in networks.items() if target is network or target == name]
        if not names:
            raise ValueError(
                f"eval_network {target!r} is not one of this agent's networks; they are {sorted(networks)}."
            )
        self.network_groups = [*self.__dict__.get("network_groups", []), names[0]]

    @staticmethod
    def get_state_dim(observation_space: Any) -> tuple[int, ...]:
        """The network input size of an observation space: ``()`` for an LLM's (None: prompts are token ids);
        a space's ``shape``, ``(n,)`` for a discrete space, or a tuple of those for a list of spaces."""
        return _space_dim(observation_space, "observation_space")

    @staticmethod
    def get_action_dim(action_space: Any) -> tuple[int, ...]:
        """The network output size of an action space, with ``get_state_dim``'s rules (``()`` for None)."""
        return _space_dim(action_space, "action_space")

    # ------------------------------------------------------------------------------------------ optimizer
    def get_lr_names(self) -> list[str]:
        """Names of the learning-rate attributes (mutated by evolution)."""
        return ["lr"]

    @staticmethod
    def update_lr(
        optimizer: torch.optim.Optimizer,
        lr: float | tuple[float, float],
        accelerator: Any | None = None,
        scheduler_config: CosineLRScheduleConfig | dict[str, Any] | None = None,
    ) -> tuple[Any | None, torch.optim.lr_scheduler.LRScheduler | None]:
        """Set a new peak learning rate on ``optimizer``; returns ``(accelerator, scheduler)``.

        Args:
            lr: one rate for every parameter group, or one per group (actor, critic) as a tuple.
            accelerator: returned as given (the optimizer stays prepared; only its rates change).
            scheduler_config: a fresh warm-up + cosine schedule over the new rate, starting at its first step;
                None (default) returns no schedule and leaves any existing one as it is (it keeps its shape).
        """
        rates = tuple(lr) if isinstance(lr, (tuple, list)) else (lr,) * len(optimizer.param_groups)
        if len(rates) != len(optimizer.param_groups):
            raise ValueError(f"lr has {len(rates)} values for an optimizer with {len(optimizer.param_groups)} groups.")
        for rate in rates:
            if rate <= 0:
                raise ValueError(f"lr must be > 0, got {rate}.")
        set_learning_rate(optimizer, rates)
        return accelerator, build_lr_scheduler(optimizer, as_schedule_config(scheduler_config))

    def reinit_optimizers(self, optimizer: Any | None = None) -> None:
        """Fresh optimizer and schedule over the trainable adapters (their state is dropped); under DeepSpeed, a
        fresh engine around them. ``optimizer`` names the one to re-initialise (None: all): an LLM agent has one,
        ``"optimizer"`` (a name, or an optimizer config with that ``name``)."""
        name = getattr(optimizer, "name", optimizer)
        if name not in (None, "optimizer"):
            raise ValueError(f"reinit_optimizers: no optimizer {name!r}; this agent has one, named 'optimizer'.")
        if self.engine is not None:
            self.policy_forward, self.engine = self.policy_forward_module, None
        self._build_optimizer()
        if self.accelerator is not None:
            self.wrap_models()
        self.recompile()

    # ------------------------------------------------------------------------------------------ compilation
    def recompile(self) -> None:
        """Compile the training forward with ``torch_compiler``'s mode (nothing when it is None).

        Called on construction, after cloning and after optimizer re-initialisation; call it after changing the
        networks yourself. Skipped under DeepSpeed, whose engine cannot be wrapped by ``torch.compile``.
        """
        mode = getattr(self, "torch_compiler", None)
        if mode is None or self.engine is not None:
            return
        forward = self.policy_forward
        self.policy_forward = torch.compile(getattr(forward, "_orig_mod", forward), mode=mode)

    # ------------------------------------------------------------------------------------------ cloning
    @staticmethod
    def copy_attributes(agent: LLMAlgorithm, clone: LLMAlgorithm) -> LLMAlgorithm:
        """Copy every attribute of ``agent`` except its collaborators (networks, optimizer, accelerator, hooks)
        onto ``clone``, as deep copies; returns ``clone``."""
        for name, value in agent.__dict__.items():
            if name not in COLLABORATORS:
                clone.__dict__[name] = copy.deepcopy(value)
        return clone

    def clone(self, index: int | None = None, wrap: bool = True) -> LLMAlgorithm:
        """An independent agent with identical adapters, optimizer and schedule state.

        The frozen base weights are shared (same tensors): a clone costs its adapters and optimizer state
        only. Training the clone never changes this agent, and vice versa.
        """
        if self.dist.zero_stage == 3:
            raise NotImplementedError(
                "clone() (and so populations and tournament selection) is not supported under DeepSpeed ZeRO-3: the "
                "adapters are partitioned across processes and a member cannot share them. Train populations with "
                "data parallel (configs/accelerate/ddp.yaml) or ZeRO-2 (configs/accelerate/zero2.yaml)."
            )
        clone = self.copy_attributes(self, object.__new__(type(self)))
        clone.accelerator = self.accelerator
        clone.dist = self.dist
        clone.engine = None
        clone.hp_config = self.hp_config
        clone.mutation_hooks = list(self.mutation_hooks)
        if "rollout_engine" in self.__dict__:
            clone.rollout_engine = self.rollout_engine.for_clone(clone)
        clone.adapters = self.adapters.copy_sharing_base()
        clone.actor = clone.adapters.model
        clone.policy_forward = clone.make_policy_forward(clone.actor)
        clone._build_optimizer()
        # Adapters, extra modules, optimizer and schedule through the checkpoint contract (host copies: nothing
        # is shared with this agent afterwards).
        # Under DeepSpeed the engine owns the optimizer state, which a fresh optimizer cannot take: the clone
        # starts with a fresh optimizer (and its engine, once wrapped).
        plain = self.engine is None
        clone.load_checkpoint_state(
            self.checkpoint_state(lora_only=True, save_optimizer=plain, to_host=True),
            load_optimizer=plain,
            overwrite_reference_adapter=True,
            overwrite_critic_adapter=True,
        )
        if index is not None:
            clone.index = index
        if self.accelerator is not None and wrap:
            clone.wrap_models()
        clone.recompile()
        return clone

    @classmethod
    def population(
        cls,
        size: int,
        observation_space: Any = None,
        action_space: Any = None,
        wrapper_cls: type | None = None,
        wrapper_kwargs: dict[str, Any] | None = None,
        hp_config: HyperparameterConfig | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """``size`` members sharing one frozen base model: ``create_population(cls, size, ...)``.

        ``observation_space`` and ``action_space`` are the spec's; an LLM agent has none (its observations are
        prompts), so anything but None is refused. ``wrapper_cls(member, **wrapper_kwargs)`` wraps each member.
        """
        from agilerl_llm.evolution.population import create_population

        for name, space in (("observation_space", observation_space), ("action_space", action_space)):
            if space is not None:
                raise ValueError(f"{cls.__name__}.population takes no {name}: LLM agents read prompts; pass None.")
        if wrapper_cls is None and wrapper_kwargs:
            raise ValueError("wrapper_kwargs were given without a wrapper_cls to pass them to.")
        members = create_population(cls, size, hp_config=hp_config, **kwargs)
        if wrapper_cls is None:
            return members
        return [wrapper_cls(member, **(wrapper_kwargs or {})) for member in members]

    @staticmethod
    def inspect_attributes(agent: LLMAlgorithm, input_args_only: bool = False) -> dict[str, Any]:
        """The agent's plain-data attributes (hyperparameters and settings), without networks or optimizers.

        Args:
            input_args_only: keep only attributes that are constructor arguments.
        """
        attributes = {"index": agent.index}
        for name, value in vars(agent).items():
            if name.startswith("_") or name in COLLABORATORS or not is_plain(value):
                continue
            attributes[name] = value
        if input_args_only:
            accepted = constructor_argument_names(type(agent))
            attributes = {name: value for name, value in attributes.items() if name in accepted}
        return attributes


def constructor_argument_names(cls: type) -> set[str]:
    """Every argument name the constructors along ``cls``'s MRO accept."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in klass.__dict__:
            accepted |= set(inspect.signature(klass.__init__).parameters)
    return accepted


def _space_dim(space: Any, field: str) -> tuple[int, ...]:
    if space is None:
        return ()
    if isinstance(space, (list, tuple)):
        return tuple(dim for item in space for dim in _space_dim(item, field))
    if getattr(space, "n", None) is not None:
        return (int(space.n),)
    if getattr(space, "shape", None) is not None:
        return tuple(int(d) for d in space.shape)
    raise TypeError(f"{field}: {type(space).__name__} has neither a shape nor n; pass a gymnasium space or None.")
