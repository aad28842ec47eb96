"""Checkpoints on disk: one agent's folder (``agent``); run-level step folders build on it (``run``)."""

from agilerl_llm.checkpoint.agent import CheckpointError, load_checkpoint, save_checkpoint, save_llm_checkpoint
from agilerl_llm.checkpoint.run import CheckpointConfig, CheckpointManager, ResumeState

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "ResumeState",
    "load_checkpoint",
    "save_checkpoint",
    "save_llm_checkpoint",
]
