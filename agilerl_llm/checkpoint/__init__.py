"""Checkpoints on disk: one agent's folder (``agent``); run-level step folders build on it."""

from agilerl_llm.checkpoint.agent import CheckpointError, load_checkpoint, save_checkpoint, save_llm_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "save_llm_checkpoint"]
