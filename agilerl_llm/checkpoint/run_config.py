"""What a run checkpoint is called and configured by: the layout's names, ``CheckpointConfig`` (validated at the
edge), ``ResumeState`` (what a resumed loop gets back) and the order a resume tries step folders in.

``checkpoint/run.py`` (the ``CheckpointManager``) writes and reads the layout these names describe; they live
apart so the CLI, the catalog and the configs can use them without the manager.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agilerl_llm.checkpoint.storage import normalize_location

POINTER_FILE = "latest_ckpt_global_step.txt"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
STEP_PREFIX = "global_step_"
RUN_FORMAT_VERSION = 1
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
_TEMP_RE = re.compile(rf"^\.({STEP_PREFIX}\d+\.(incomplete|replaced)|{re.escape(POINTER_FILE)}\.tmp)$")


class CheckpointConfig(BaseModel):
    """Where and how often a training run checkpoints, how many to keep, and how it resumes.

    Attributes:
        path: the folder holding the step folders: a local path or an fsspec URL (``s3://bucket/run``,
            ``gs://bucket/run``, ``memory://run``; S3 and GCS need the ``s3`` / ``gcs`` extra).
        interval: save every this many global steps; the last step of a run is always saved.
        keep: keep only the newest ``keep`` complete step folders (None keeps all).
        resume: "latest" (default) continues from the newest complete checkpoint under ``path`` and starts fresh
            when there is none; "none" always starts fresh and refuses a non-empty ``path`` unless ``overwrite``;
            "from_path" resumes from the step folder ``resume_path`` (which must be complete).
        resume_path: the ``global_step_<N>`` folder (path or URL) to resume from (only with resume="from_path").
        resume_step: resume from ``<path>/global_step_<resume_step>`` instead of the newest (with resume="latest").
        overwrite: with resume="none", delete the checkpoints already under ``path`` instead of refusing.
        save_async: snapshot the state to host memory and write it in a background thread while training goes
            on; the next save (and the end of the run) waits for it, and a failed write raises there. Agents with
            a DeepSpeed engine save synchronously. On remote storage the upload happens in the background too.
        storage_options: keyword arguments for the fsspec filesystem of remote URLs (credentials, endpoint:
            ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``).
        hf_save_interval: export the policy in Hugging Face format every this many steps (and on the last one);
            needs ``export_path``.
        export_path: where exports go (local path or fsspec URL); needs ``hf_save_interval``.
    """

    model_config = ConfigDict(extra="forbid")

    path: Path | str
    interval: int = Field(10, ge=1)
    keep: int | None = Field(None, ge=1)
    resume: Literal["none", "latest", "from_path"] = "latest"
    resume_path: Path | str | None = None
    resume_step: int | None = Field(None, ge=0)
    overwrite: bool = False
    save_async: bool = False
    storage_options: dict[str, Any] = Field(default_factory=dict)
    hf_save_interval: int | None = Field(None, ge=1)
    export_path: Path | str | None = None

    @field_validator("path", "resume_path", "export_path", mode="before")
    @classmethod
    def _check_location(cls, value: Any, info: Any) -> Any:
        return normalize_location(value, info.field_name)

    @model_validator(mode="after")
    def _check_resume(self) -> CheckpointConfig:
        if (self.hf_save_interval is None) != (self.export_path is None):
            raise ValueError("hf_save_interval and export_path go together: set both to export, or neither.")
        if self.resume == "from_path" and self.resume_path is None:
            raise ValueError("resume_path: resume='from_path' needs resume_path (a global_step_<N> folder).")
        if self.resume != "from_path" and self.resume_path is not None:
            raise ValueError(f"resume_path is only used with resume='from_path' (resume={self.resume!r}).")
        if self.resume_step is not None and self.resume != "latest":
            raise ValueError(f"resume_step picks a step under path; it needs resume='latest' (resume={self.resume!r}).")
        if self.overwrite and self.resume != "none":
            raise ValueError("overwrite only applies to resume='none' (a fresh run over existing checkpoints).")
        return self


class ResumeState(BaseModel):
    """What a resumed loop needs to continue: where it was, which W&B run it logged to, the members' indices and
    the ``extra`` dict the save stored (e.g. evolution state)."""

    model_config = ConfigDict(extra="forbid")

    global_step: int
    samples_seen: int
    wandb_run_id: str | None = None
    path: Path | str
    extra: dict[str, Any] = Field(default_factory=dict)
    agent_indices: list[int] = Field(default_factory=list)


def resume_order(pointer_text: str | None, complete_steps: list[int]) -> list[int]:
    """Complete steps in the order a resume tries them: the step the pointer names (when it is complete) first,
    then the others, newest first."""
    try:
        pointed = int((pointer_text or "").strip())
    except ValueError:
        pointed = None
    ordered = sorted(complete_steps, reverse=True)
    if pointed in ordered:
        ordered.remove(pointed)
        ordered.insert(0, pointed)
    return ordered
