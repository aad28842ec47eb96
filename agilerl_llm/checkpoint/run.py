"""Run checkpoints: periodic step folders for a whole population, a "latest" pointer, retention and resume.

Layout under ``CheckpointConfig.path``::

    latest_ckpt_global_step.txt          the newest complete step, written last and atomically
    global_step_<N>/
        agent_<i>/                       population member i, the agent grid (lora_only=True, save_optimizer=True)
        rng_state.safetensors            torch CPU (and CUDA) generator states of the main process
        rng_state_rank<r>.safetensors    the same for every other process, when there are several
        trainer_state.json               step, samples seen, env data position, W&B run id, python/numpy RNG
                                         states (plain JSON; nothing is pickled). Written last inside the folder.

A step folder is written as the hidden sibling ``.global_step_<N>.incomplete`` and renamed once everything in it
is on disk, so a folder named ``global_step_<N>`` that holds ``trainer_state.json`` is complete. Only after the
rename is the pointer replaced (temp file + ``os.replace``), and only then does retention delete older complete
folders. A crash at any moment therefore leaves either the previous checkpoint or the new one as the newest
complete one, never a half-written folder that a resume would pick. Leftover temporary entries are removed when
a manager starts.

``path`` may also be an fsspec URL (``s3://``, ``gs://``, ``memory://``): a step folder is staged locally, then
uploaded with ``trainer_state.json`` last, then the pointer, then retention (``storage.py``, docs/checkpoints.md).

With ``CheckpointConfig.save_async`` the calling thread only snapshots the state into host memory (adapters,
optimizer and LR-schedule state copied to CPU, trainer state, RNG) and a background thread writes it, in the same
order and with the same files and bytes as a synchronous save. The next save, ``wait()`` and ``close()`` wait for
the write in flight and re-raise its error, if any.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file

from agilerl_llm.checkpoint.agent import load_checkpoint as load_agent_checkpoint
from agilerl_llm.checkpoint.agent import save_checkpoint as save_agent_checkpoint
from agilerl_llm.checkpoint.rng import capture_rng, restore_rng
from agilerl_llm.checkpoint.snapshot import snapshot_checkpoint, write_snapshot
from agilerl_llm.checkpoint.state import AgentState, Distribution
from agilerl_llm.checkpoint.storage import (
    RemoteStore,
    basename,
    fsync_dir,
    is_remote,
    join,
    local_copy,
    local_work_dir,
    normalize_location,
    write_json_durably,
)

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm

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


class CheckpointManager:
    """Writes and finds run checkpoints (see the module docstring for the layout and the crash-safety rules).

    Every process calls every method; only the main process (of the first agent's accelerator) touches shared
    files, and all processes wait for it where it matters. ``path`` (and the folders this returns) is a ``Path``
    for local storage and a URL string for remote storage.
    """

    def __init__(self, config: CheckpointConfig, dist_agent: LLMAlgorithm | None = None) -> None:
        self.config = config
        self._store = RemoteStore(config.path, config.storage_options) if is_remote(config.path) else None
        self.path: Path | str = self._store.url if self._store is not None else Path(config.path)
        self._dist = Distribution(dist_agent) if dist_agent is not None else None
        if self._store.isfile("") if self._store is not None else self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"checkpoint path {self.path} exists and is not a folder.")
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        # The last async snapshot of each population slot, kept so that the next one can reuse its host buffers.
        # Only ever reused after ``wait()``: by then the write that read it is over.
        self._snapshots: dict[int, AgentState] = {}
        if self._is_main:
            if self._store is None:
                self.path.mkdir(parents=True, exist_ok=True)
            self.clean_temporaries()
        self._wait()

    # ------------------------------------------------------------------------------------------- distribution
    @property
    def _is_main(self) -> bool:
        return self._dist is None or self._dist.is_main

    @property
    def _rank(self) -> int:
        accelerator = None if self._dist is None else self._dist.accelerator
        return 0 if accelerator is None else int(accelerator.process_index)

    def _wait(self) -> None:
        if self._dist is not None:
            self._dist.wait()

    # ------------------------------------------------------------------------------------------- finding
    def step_dir(self, step: int) -> Path | str:
        return join(self.path, f"{STEP_PREFIX}{step}")

    def clean_temporaries(self) -> list[Path | str]:
        """Delete what a crash left half-written: hidden staging folders and pointer temp files (local), step
        folders without trainer state (remote: an interrupted upload) and local staging leftovers; returns what
        was removed."""
        if self._store is not None:
            shutil.rmtree(local_work_dir(self._store.url), ignore_errors=True)
            return self._store.remove_incomplete(_STEP_RE, TRAINER_STATE_FILE)
        removed: list[Path | str] = []
        for entry in self.path.iterdir() if self.path.is_dir() else []:
            if _TEMP_RE.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
        return removed

    @staticmethod
    def is_complete(folder: str | os.PathLike) -> bool:
        """A local step folder is complete when it has its final name and its trainer state (written last)."""
        folder = Path(folder)
        return _STEP_RE.match(folder.name) is not None and (folder / TRAINER_STATE_FILE).is_file()

    def _folder_store(self, folder: str) -> RemoteStore:
        if self._store is not None and folder.rstrip("/").rsplit("/", 1)[0] == self._store.url:
            return self._store.sub(basename(folder))
        return RemoteStore(folder, self.config.storage_options)

    def _is_complete_at(self, folder: Path | str) -> bool:
        if isinstance(folder, Path):
            return self.is_complete(folder)
        return _STEP_RE.match(basename(folder)) is not None and self._folder_store(folder).isfile(TRAINER_STATE_FILE)

    def _names(self) -> list[str]:
        if self._store is not None:
            return self._store.listdir()
        return [entry.name for entry in self.path.iterdir()] if self.path.is_dir() else []

    def complete_steps(self) -> list[int]:
        """The steps of every complete step folder under ``path``, ascending."""
        steps = []
        for name in self._names():
            match = _STEP_RE.match(name)
            if match and self._is_complete_at(join(self.path, name)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest complete step: the pointer's, or the highest complete folder when the pointer is missing,
        unreadable, or names a folder that is missing or incomplete. None when there is no complete checkpoint."""
        try:
            if self._store is not None:
                text = self._store.read_text(POINTER_FILE)
                step = None if text is None else int(text.strip())
            else:
                step = int((self.path / POINTER_FILE).read_text().strip())
        except (OSError, ValueError):
            step = None
        if step is not None and self._is_complete_at(self.step_dir(step)):
            return step
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def resume_dir(self) -> Path | str | None:
        """The step folder this run resumes from under its config, or None to start fresh.

        Raises:
            FileExistsError: resume="none" on a path that already holds entries, without overwrite.
            FileNotFoundError: resume_path / resume_step names a folder that is missing or incomplete.
        """
        config = self.config
        if config.resume == "none":
            entries = sorted(self._names())
            if entries and not config.overwrite:
                raise FileExistsError(
                    f"checkpoint path {self.path} is not empty ({', '.join(entries[:5])}...) and resume='none'; "
                    "resume with resume='latest', choose another path, or set overwrite=True to delete its "
                    "checkpoints."
                )
            return None
        if config.resume == "from_path":
            return self._require_complete(config.resume_path, "resume_path")
        if config.resume_step is not None:
            return self._require_complete(self.step_dir(config.resume_step), "resume_step")
        step = self.latest_step()
        return None if step is None else self.step_dir(step)

    def _require_complete(self, folder: Path | str, field: str) -> Path | str:
        if is_remote(folder):
            folder = str(folder).rstrip("/")
            exists = self._folder_store(folder).exists()
        else:
            folder = Path(folder)
            exists = folder.is_dir()
        if not exists:
            available = self.complete_steps()
            raise FileNotFoundError(
                f"{field}: checkpoint folder {folder} does not exist (complete steps under {self.path}: {available})."
            )
        if not self._is_complete_at(folder):
            raise FileNotFoundError(
                f"{field}: {folder} is not a complete run checkpoint (a global_step_<N> folder with "
                f"{TRAINER_STATE_FILE}); it may be a save that was interrupted."
            )
        return folder

    def prepare_fresh(self) -> None:
        """For resume='none' with overwrite: delete this manager's checkpoints (other files are left alone)."""
        if self._is_main and self.config.overwrite:
            if self._store is not None:
                for name in self._store.listdir():
                    if _STEP_RE.match(name) or name == POINTER_FILE:
                        self._store.rm(name)
            else:
                for entry in self.path.iterdir():
                    if _STEP_RE.match(entry.name) and entry.is_dir():
                        shutil.rmtree(entry)
                    elif entry.name == POINTER_FILE:
                        entry.unlink()
        self._wait()

    # ------------------------------------------------------------------------------------------- saving
    def should_save(self, step: int, max_steps: int) -> bool:
        return step % self.config.interval == 0 or step == max_steps

    def should_export(self, step: int, max_steps: int) -> bool:
        """Whether this step exports the policy in Hugging Face format (``hf_save_interval``, and the last step)."""
        interval = self.config.hf_save_interval
        return interval is not None and (step % interval == 0 or step == max_steps)

    def _staging_dir(self, name: str) -> Path:
        if self._store is not None:  # the same local folder in every process of a node
            return local_work_dir(self._store.url) / f".{name}.incomplete"
        return self.path / f".{name}.incomplete"

    def save(
        self,
        step: int,
        pop: list[LLMAlgorithm],
        env: Any,
        *,
        samples_seen: int = 0,
        wandb_run_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path | str:
        """Write ``global_step_<step>`` for the whole population, then the pointer, then apply retention.

        ``env`` must provide ``state_dict()`` (plain JSON data); it is saved as the data position to continue from.
        With ``save_async`` this returns once the state is snapshotted; the folder appears when the background
        write (and, on remote storage, the upload) completes (``wait()``).
        """
        self.wait()  # one save at a time; a failed earlier write raises here
        final = self.step_dir(step)
        staging = self._staging_dir(basename(final))
        if self._is_main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        self._wait()
        save_async = self.config.save_async and self._can_snapshot(pop)
        snapshots: list[AgentState] = []
        # The previous snapshots are overwritten below; the write that read them must be over (``wait()`` above).
        assert self._pending is None, "a background write is still in flight"
        for i, agent in enumerate(pop):
            if save_async:  # without an engine there is nothing collective to do: only the main process writes
                if self._is_main:
                    previous = self._snapshots.pop(i, None)
                    snapshots.append(
                        snapshot_checkpoint(agent, lora_only=True, save_optimizer=True, to_host=True, reuse=previous)
                    )
            else:
                save_agent_checkpoint(agent, staging / f"agent_{i}", lora_only=True, save_optimizer=True)
        rng_tensors, rng_json = capture_rng()
        rng_file = RNG_FILE if self._rank == 0 else f"rng_state_rank{self._rank}.safetensors"
        if not (save_async and self._is_main):
            save_file(rng_tensors, str(staging / rng_file))
        self._wait()
        if self._is_main:
            state_text = json.dumps(
                {
                    "format_version": RUN_FORMAT_VERSION,
                    "global_step": step,
                    "samples_seen": int(samples_seen),
                    "num_agents": len(pop),
                    "agent_indices": [int(getattr(agent, "index", i)) for i, agent in enumerate(pop)],
                    "algorithm": [type(agent).__name__ for agent in pop],
                    "env_state": env.state_dict() if env is not None else None,
                    "wandb_run_id": wandb_run_id,
                    "rng": rng_json,
                    "extra": extra or {},
                }
            )
            if save_async:
                self._snapshots = dict(enumerate(snapshots))  # host buffers for the next save, once this write is done
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
                self._pending = self._executor.submit(
                    self._write_in_background, step, staging, snapshots, rng_tensors, rng_file, state_text
                )
            else:
                self._finish(step, staging, state_text)
        if not save_async:  # every rank takes the same branch, so the barriers stay paired
            self._wait()
        return final

    def _write_in_background(
        self,
        step: int,
        staging: Path,
        snapshots: list[AgentState],
        rng_tensors: dict[str, torch.Tensor],
        rng_file: str,
        state_text: str,
    ) -> None:
        for i, snapshot in enumerate(snapshots):
            write_snapshot(snapshot, staging / f"agent_{i}")
        save_file(rng_tensors, str(staging / rng_file))
        self._finish(step, staging, state_text)

    def _finish(self, step: int, staging: Path, state_text: str) -> None:
        """Main process: trainer state (last in the folder), rename, pointer, retention; in this order."""
        final = self.step_dir(step)
        write_json_durably(staging / TRAINER_STATE_FILE, state_text)
        if self._store is not None:  # upload with the trainer state last (storage.RemoteStore.replace_folder)
            self._store.replace_folder(staging, basename(final), last=TRAINER_STATE_FILE)
        else:
            self._rename_into_place(staging, final)
        self._write_pointer(step)
        self._retain(step)

    def _rename_into_place(self, staging: Path, final: Path) -> None:
        fsync_dir(staging)
        if final.exists():  # a re-run from an earlier step replaces the stale folder only once the new one is done
            replaced = self.path / f".{final.name}.replaced"
            if replaced.exists():
                shutil.rmtree(replaced)
            os.rename(final, replaced)
            os.rename(staging, final)
            shutil.rmtree(replaced)
        else:
            os.rename(staging, final)
        fsync_dir(self.path)

    def _can_snapshot(self, pop: list[LLMAlgorithm]) -> bool:
        if all(agent._deepspeed_engine() is None for agent in pop):
            return True
        warnings.warn(
            "save_async: a DeepSpeed engine writes its checkpoint collectively; saving synchronously instead.",
            UserWarning,
            stacklevel=3,
        )
        return False

    def wait(self) -> None:
        """Block until the background write in flight (if any) is complete; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, *, raise_error: bool = True) -> None:
        """Wait for the last write and stop the writer thread. ``raise_error=False`` (for a loop that is already
        failing) waits without re-raising the writer's error."""
        try:
            if raise_error:
                self.wait()
            else:
                try:
                    self.wait()
                except Exception:
                    pass
        finally:
            self._snapshots = {}  # the host copies kept for reuse
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _write_pointer(self, step: int) -> None:
        if self._store is not None:
            return self._store.write_text(POINTER_FILE, f"{step}\n")  # one object: old or new, never a part
        pointer = self.path / POINTER_FILE
        temp = self.path / f".{POINTER_FILE}.tmp"
        with open(temp, "w") as handle:
            handle.write(f"{step}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, pointer)
        fsync_dir(self.path)

    def _retain(self, newest: int) -> None:
        """Keep the newest ``keep`` complete folders (the one just written always among them); delete older ones."""
        keep = self.config.keep
        if keep is None:
            return
        steps = [step for step in self.complete_steps() if step <= newest]
        kept = set(steps[-keep:]) | {newest}
        for step in steps:
            if step not in kept:
                self._store.rm(f"{STEP_PREFIX}{step}") if self._store else shutil.rmtree(self.step_dir(step))

    # ------------------------------------------------------------------------------------------- loading
    def load(self, folder: str | os.PathLike, pop: list[LLMAlgorithm], env: Any | None = None) -> ResumeState:
        """Restore the population, the env's data position and the RNG states from a complete step folder.

        Adapters (actor, reference, critic), optimizer and LR schedule come back exactly as saved: the saved
        reference is restored rather than replaced by the actor, so the KL anchor does not move. Each member's
        ``index`` is set to the one it had when saved. A remote folder is downloaded to a local temporary folder
        first (removed afterwards).
        """
        self.wait()
        folder = self._require_complete(folder if is_remote(folder) else Path(folder), "checkpoint")
        remote = None if isinstance(folder, Path) else self._folder_store(folder)
        with local_copy(folder, remote, self._is_main, self._wait) as local:
            state = self._load_local(local, pop, env)
        return self._resume_state(state, folder)

    def _load_local(self, folder: Path, pop: list[LLMAlgorithm], env: Any | None) -> dict[str, Any]:
        state = json.loads((folder / TRAINER_STATE_FILE).read_text())
        if state.get("format_version") != RUN_FORMAT_VERSION:
            raise ValueError(
                f"{folder / TRAINER_STATE_FILE} has format_version {state.get('format_version')!r}; "
                f"this version reads {RUN_FORMAT_VERSION}."
            )
        if state["num_agents"] != len(pop):
            raise ValueError(
                f"{folder} holds {state['num_agents']} agents but the population has {len(pop)}; build the same "
                "population size to resume."
            )
        for i in range(len(pop)):
            if not (folder / f"agent_{i}").is_dir():
                raise FileNotFoundError(f"{folder / f'agent_{i}'} is missing from a checkpoint marked complete.")
        indices = state.get("agent_indices") or []
        for i, agent in enumerate(pop):
            load_agent_checkpoint(
                agent,
                folder / f"agent_{i}",
                load_optimizer=True,
                overwrite_reference_adapter=True,
                overwrite_critic_adapter=True,
            )
            if i < len(indices):  # evolution renumbers members; the agent checkpoint leaves index alone
                agent.index = int(indices[i])
        if env is not None and state.get("env_state") is not None:
            env.load_state_dict(state["env_state"])
        rng_file = folder / (RNG_FILE if self._rank == 0 else f"rng_state_rank{self._rank}.safetensors")
        if not rng_file.is_file():
            rng_file = folder / RNG_FILE  # resumed with more processes than saved: fall back to the main's
        restore_rng(load_file(str(rng_file)), state["rng"])
        return state

    @staticmethod
    def _resume_state(state: dict[str, Any], folder: Path | str) -> ResumeState:
        return ResumeState(
            global_step=int(state["global_step"]),
            samples_seen=int(state["samples_seen"]),
            wandb_run_id=state.get("wandb_run_id"),
            path=folder,
            extra=state.get("extra") or {},
            agent_indices=[int(i) for i in state.get("agent_indices") or []],
        )

    def resume_info(self) -> ResumeState | None:
        """Where a resume would continue (step, samples, W&B run id, ``extra``) without loading anything; None
        when fresh.

        Read it before building the logger to continue the same W&B run:
        ``wandb_kwargs={"id": info.wandb_run_id, "resume": "allow"}``.
        """
        folder = None if self.config.resume == "none" else self.resume_dir()
        if folder is None:
            return None
        store = None if isinstance(folder, Path) else self._folder_store(folder)
        text = (folder / TRAINER_STATE_FILE).read_text() if store is None else store.read_text(TRAINER_STATE_FILE)
        if text is None:
            raise FileNotFoundError(f"{folder}: {TRAINER_STATE_FILE} disappeared while reading it.")
        return self._resume_state(json.loads(text), folder)

    def restore(self, pop: list[LLMAlgorithm], env: Any | None = None) -> ResumeState | None:
        """Apply the config's resume mode: load the chosen checkpoint, or prepare a fresh start (None)."""
        folder = self.resume_dir()
        if folder is None:
            if self.config.resume == "none":
                self.prepare_fresh()
            return None
        return self.load(folder, pop, env)
