"""Checkpoints for ``LLMAlgorithm``: what an agent's checkpoint holds, and saving / loading it.

The agent checkpoint contract (``agilerl_llm.checkpoint.state``): what this agent is made of is said here
(``adapter_names`` on the base class, ``checkpoint_modules``); every save, load, async snapshot, run checkpoint and
clone goes through ``checkpoint_state`` / ``load_checkpoint_state``. The work itself is done in
``agilerl_llm.checkpoint`` (``agent.py`` for the folder layout and grid, ``rebuild.py`` for ``load``); this mixin is
the agent's side of it, kept apart from ``base.py`` so the base class stays about wiring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from agilerl_llm.algorithms.arguments import refuse_extra_arguments
from agilerl_llm.checkpoint.agent import apply_state
from agilerl_llm.checkpoint.agent import load_checkpoint as load_agent_checkpoint
from agilerl_llm.checkpoint.agent import save_checkpoint as save_agent_checkpoint
from agilerl_llm.checkpoint.snapshot import HostCopier
from agilerl_llm.checkpoint.state import AgentState, CheckpointModule, capture_state

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm


class CheckpointMixin:
    """``checkpoint_state`` / ``load_checkpoint_state`` and the public save / load methods (mixed into
    ``LLMAlgorithm``)."""

    def checkpoint_modules(self) -> dict[str, CheckpointModule]:
        """Trainable modules besides the LoRA adapters that checkpoints must carry (none here; PPO: its value
        head). Saved as ``modules/<name>.safetensors``."""
        return {}

    def checkpoint_state(
        self,
        lora_only: bool = True,
        save_optimizer: bool = True,
        *,
        to_host: bool = False,
        reuse: AgentState | None = None,
        copier: HostCopier | None = None,
    ) -> AgentState:
        """Everything a checkpoint of this agent holds, in memory: adapters, extra modules, optimizer and LR
        schedule, hyperparameters. ``to_host`` copies it to CPU memory (fixed while training goes on); ``reuse``
        and ``copier`` are ``capture_state``'s."""
        return capture_state(
            self, lora_only=lora_only, save_optimizer=save_optimizer, to_host=to_host, reuse=reuse, copier=copier
        )

    def load_checkpoint_state(
        self,
        state: AgentState,
        load_optimizer: bool = True,
        overwrite_reference_adapter: bool = False,
        overwrite_critic_adapter: bool = True,
        check_base_model: bool = True,
    ) -> None:
        """Apply a state from ``checkpoint_state`` (or read from disk); the options are ``load_checkpoint``'s."""
        apply_state(
            self, state, load_optimizer, overwrite_reference_adapter, overwrite_critic_adapter, check_base_model
        )
        self._weights_version += 1

    def save_checkpoint(self, path: str, lora_only: bool = True, save_optimizer: bool = True, **kwargs: Any) -> None:
        """Write this agent to the folder ``path``; see ``agilerl_llm.checkpoint.agent`` for the layout and grid.
        ``**kwargs`` is in the spec's signature; any given is refused (TypeError), never ignored."""
        refuse_extra_arguments("save_checkpoint", (), kwargs, "path, lora_only, save_optimizer")
        save_agent_checkpoint(self, path, lora_only=lora_only, save_optimizer=save_optimizer)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu", accelerator: Any | None = None) -> LLMAlgorithm:
        """A working agent rebuilt from the checkpoint folder ``path`` alone, on ``device`` (or the accelerator's):
        its base model (recorded in the checkpoint), settings, adapters, optimizer and schedule as saved. See
        ``agilerl_llm.checkpoint.rebuild``."""
        from agilerl_llm.checkpoint.rebuild import load_agent

        return load_agent(cls, path, device, accelerator)

    def load_checkpoint(
        self,
        path: str,
        load_optimizer: bool = True,
        overwrite_reference_adapter: bool = False,
        overwrite_critic_adapter: bool = True,
        check_base_model: bool = True,
    ) -> None:
        """Load a checkpoint made by ``save_checkpoint`` onto this agent (same base model and LoRA config).

        By default the loaded actor also becomes the reference (SFT -> DPO -> GRPO); see ``checkpoint/agent.py``.
        """
        load_agent_checkpoint(
            self, path, load_optimizer, overwrite_reference_adapter, overwrite_critic_adapter, check_base_model
        )
