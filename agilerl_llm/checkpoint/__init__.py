"""Checkpoints on disk: one agent's folder (``agent``); run-level step folders build on it (``run``), on local disk
or any fsspec store (``storage``); merged HuggingFace exports (``export``); listing and checking runs (``catalog``)."""

from agilerl_llm.checkpoint.agent import CheckpointError, load_checkpoint, save_checkpoint, save_llm_checkpoint
from agilerl_llm.checkpoint.catalog import StepInfo, list_checkpoints, verify_checkpoint
from agilerl_llm.checkpoint.export import export_checkpoint, export_policy
from agilerl_llm.checkpoint.run import CheckpointConfig, CheckpointManager, ResumeState

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "ResumeState",
    "StepInfo",
    "export_checkpoint",
    "export_policy",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "save_llm_checkpoint",
    "verify_checkpoint",
]
