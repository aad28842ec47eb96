"""Run checkpoints: periodic step folders for a whole population, a "latest" pointer, retention and resume.

Layout under ``CheckpointConfig.path``::

    latest_ckpt_global_step.txt          the newest complete step, written last and atomically
    global_step_<N>/
        agent_<i>/                       population member i, the agent grid (lora_only=True, save_optimizer=True)
        rng_state.safetensors            torch CPU (and CUDA) generator states of the main process
        rng_state_rank<r>.safetensors    the same for every other process, when there are several
        trainer_state.json               step, samples seen, env data position, W&B run id, world size, every
                                         process's python/numpy RNG states (plain JSON; nothing is pickled).
                                         Written last inside the folder.

Resuming on the world size a checkpoint was saved with is exact (every rank gets its own RNG states back; the
data position is global). On another world size the agents, optimizers and data position are restored, but the
per-process random streams cannot be (they do not map onto a different number of processes): a warning says so.

A step folder is written as the hidden sibling ``.global_step_<N>.incomplete``, every file in it is fsynced, then
``trainer_state.json`` is written, and the folder is renamed (``storage.Store.publish``), so a folder named
``global_step_<N>`` that holds ``trainer_state.json`` is complete. Only after the
rename is the pointer replaced (temp file + ``os.replace``), and only then does retention delete older complete
folders. A crash at any moment therefore leaves either the previous checkpoint or the new one as the newest
complete one, never a half-written folder that a resume would pick. Leftover temporary entries are removed when
a manager starts.

``path`` may also be an fsspec URL (``s3://``, ``gs://``, ``memory://``): a step folder is staged locally, then
uploaded with ``trainer_state.json`` last, then the pointer, then retention (``storage.py``, docs/checkpoints.md).

With ``CheckpointConfig.save_async`` the calling thread only snapshots the state into host memory (adapters,
optimizer and LR-schedule state copied to CPU, trainer state, RNG) and a background thread writes it, in the same
order and with the same files and bytes as a synchronous save. The next save, ``wait()`` and ``close()`` wait for
the write in flight and re-raise its error, if any. Copies into the previous snapshot's host buffers (every save
after the first) are done by the writer thread too, before it writes; until they are done every optimizer step
waits for them (``utils.write_fence``), and a tensor changed in place without that fence fails the save
(``TornSnapshotError``) rather than publishing a checkpoint that mixes two steps.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from agilerl_llm.checkpoint.agent import save_checkpoint as save_agent_checkpoint
from agilerl_llm.checkpoint.files import CheckpointError
from agilerl_llm.checkpoint.rng import capture_rng, restore_rng
from agilerl_llm.checkpoint.run_config import (  # re-exported: the manager's public names stay importable from here
    _STEP_RE,
    _TEMP_RE,
    POINTER_FILE,
    RNG_FILE,
    RUN_FORMAT_VERSION,
    STEP_PREFIX,
    TRAINER_STATE_FILE,
    CheckpointConfig,
    ResumeState,
    resume_order,
)
from agilerl_llm.checkpoint.snapshot import DeferredCopy, HostCopier, write_snapshot
from agilerl_llm.checkpoint.state import AgentState, Distribution, read_state
from agilerl_llm.checkpoint.storage import LOCK_FILE, Store, basename, new_run_id
from agilerl_llm.utils.notices import warn_once

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm


class CheckpointManager:
    """Writes and finds run checkpoints (see the module docstring for the layout and the crash-safety rules).

    Every process calls every method; only the main process (of the first agent's accelerator) touches shared
    files, and all processes wait for it where it matters. ``path`` (and the folders this returns) is a ``Path``
    for local storage and a URL string for remote storage; both go through one ``storage.Store``.

    A manager is the one writer of its path: the main process takes a lock (``.agilerl_llm.lock``: pid, host,
    start time, run id) before touching anything, and a second run on the same path fails at start naming the
    first. ``close()`` releases it; a lock left by a dead process on the same host is taken over with a warning.
    """

    def __init__(self, config: CheckpointConfig, dist_agent: LLMAlgorithm | None = None, writer: bool = True) -> None:
        """``writer=False`` opens the path to look only (``resume_info``, ``complete_steps``...): no lock, no
        clean-up, nothing created; such a manager must not save."""
        self.config = config
        self._store = Store(config.path, config.storage_options)
        self.path: Path | str = self._store.location()
        self._dist = Distribution(dist_agent) if dist_agent is not None else None
        if self._store.isfile(""):
            raise NotADirectoryError(f"checkpoint path {self.path} exists and is not a folder.")
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        # The last async snapshot of each population slot, kept so that the next one can reuse its host buffers.
        # Only ever reused after ``wait()``: by then the write that read it is over.
        self._snapshots: dict[int, AgentState] = {}
        self._resume_choice: tuple[Any, ...] | None = None
        self.run_id = new_run_id()
        self._lock_release = None
        self._writer = writer
        if self._is_main and writer:
            self._store.makedirs()
            self._check_writable()
            self._store.acquire_lock(self.run_id)
            self._lock_release = weakref.finalize(self, self._store.release_lock, self.run_id)
            self.clean_temporaries()
        self._wait()

    def _check_writable(self) -> None:
        """Fail at start, not at the first save, when the folder cannot be written."""
        if isinstance(self.path, Path) and not os.access(self.path, os.W_OK | os.X_OK):
            raise PermissionError(
                f"checkpoint path {self.path} is not writable by this process; fix its permissions or choose "
                "another CheckpointConfig.path."
            )

    # ------------------------------------------------------------------------------------------- distribution
    @property
    def _is_main(self) -> bool:
        return self._dist is None or self._dist.is_main

    @property
    def _rank(self) -> int:
        return 0 if self._dist is None else self._dist.rank

    def _wait(self) -> None:
        if self._dist is not None:
            self._dist.wait()

    @property
    def _world_size(self) -> int:
        return 1 if self._dist is None else self._dist.world_size

    def _gather(self, value: Any) -> list[Any]:
        return [value] if self._dist is None else self._dist.dist.gather_objects(value)

    # ------------------------------------------------------------------------------------------- finding
    def step_dir(self, step: int) -> Path | str:
        return self._store.location(f"{STEP_PREFIX}{step}")

    def clean_temporaries(self) -> list[Path | str]:
        """Delete what a crash left half-written: hidden staging folders and pointer temp files, step folders
        without trainer state on object stores (an interrupted upload) and local staging leftovers; returns what
        was removed."""
        return self._store.remove_incomplete(_STEP_RE, TRAINER_STATE_FILE, _TEMP_RE)

    @staticmethod
    def is_complete(folder: str | os.PathLike) -> bool:
        """A step folder (local path or URL) is complete when it has its final name and its trainer state
        (written last)."""
        return _STEP_RE.match(basename(folder)) is not None and Store(folder).isfile(TRAINER_STATE_FILE)

    def _name_of(self, folder: Path | str) -> tuple[Store, str]:
        """The store and name of a step folder given as a path or URL (this run's, or any other location)."""
        text = os.fspath(folder).rstrip("/")
        parent = os.fspath(self.path).rstrip("/")
        if text.rsplit("/", 1)[0] == parent:
            return self._store, basename(text)
        parent_location, name = text.rsplit("/", 1) if "/" in text else (".", text)
        location = Path(parent_location) if isinstance(folder, Path) else parent_location
        return Store(location, self.config.storage_options), name

    def _is_complete_name(self, store: Store, name: str) -> bool:
        return _STEP_RE.match(name) is not None and store.isfile(f"{name}/{TRAINER_STATE_FILE}")

    def complete_steps(self) -> list[int]:
        """The steps of every complete step folder under ``path``, ascending."""
        steps = []
        for name in self._store.listdir():
            match = _STEP_RE.match(name)
            if match and self._is_complete_name(self._store, name):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest complete step: the pointer's, or the highest complete folder when the pointer is missing,
        unreadable, or names a folder that is missing or incomplete. None when there is no complete checkpoint.
        (Whether its files are intact is checked by ``resume_dir``.)"""
        candidates = self._latest_candidates()
        return candidates[0] if candidates else None

    def _latest_candidates(self) -> list[int]:
        """Complete steps in the order a resume tries them: the pointer's step first, then newest first."""
        return resume_order(self._store.read_text(POINTER_FILE), self.complete_steps())

    def resume_dir(self) -> Path | str | None:
        """The step folder this run resumes from under its config, or None to start fresh.

        With resume="latest" the newest complete step is verified (every file read back, as
        ``agilerl-llm checkpoints verify`` does); a damaged one is skipped with a warning naming the problem and
        the next newest that verifies is used.

        Raises:
            FileExistsError: resume="none" on a path that already holds entries, without overwrite.
            FileNotFoundError: resume_path / resume_step names a folder that is missing or incomplete.
            CheckpointError: resume_path / resume_step names a damaged folder, or every complete step under
                ``path`` is damaged (the message lists why).
        """
        config = self.config
        if config.resume == "none":
            entries = sorted(name for name in self._store.listdir() if name != LOCK_FILE)
            if entries and not config.overwrite:
                raise FileExistsError(
                    f"checkpoint path {self.path} is not empty ({', '.join(entries[:5])}...) and resume='none'; "
                    "resume with resume='latest', choose another path, or set overwrite=True to delete its "
                    "checkpoints."
                )
            return None
        if self._resume_choice is not None and self._resume_choice[0] == config:
            return self._resume_choice[1]
        if config.resume == "from_path":
            chosen = self._require_verified(config.resume_path, "resume_path")
        elif config.resume_step is not None:
            chosen = self._require_verified(self.step_dir(config.resume_step), "resume_step")
        else:
            chosen = self._newest_verified()
        self._resume_choice = (config, chosen)
        return chosen

    def _newest_verified(self) -> Path | str | None:
        candidates = self._latest_candidates()
        skipped = []
        for step in candidates:
            problems = self._problems(self._store, f"{STEP_PREFIX}{step}")
            if not problems:
                if skipped:
                    warnings.warn(
                        f"resume: skipping damaged checkpoint(s) {'; '.join(skipped)}; resuming from step {step}.",
                        UserWarning,
                        stacklevel=3,
                    )
                return self.step_dir(step)
            skipped.append(f"step {step}: {problems[0]}")
        if skipped:
            raise CheckpointError(
                f"every complete checkpoint under {self.path} is damaged, so there is nothing to resume from: "
                f"{'; '.join(skipped)}. Restore the files, or start a fresh run (resume='none' with another path)."
            )
        return None

    def _problems(self, store: Store, name: str) -> list[str]:
        from agilerl_llm.checkpoint.catalog import verify_step_folder

        with store.materialize(name, self._is_main, self._wait) as local:
            return store.shows(local.parent, verify_step_folder(local))

    def _require_verified(self, folder: Path | str, field: str) -> Path | str:
        store, name = self._name_of(folder)
        shown = store.location(name)
        if not store.isdir(name):
            available = self.complete_steps()
            raise FileNotFoundError(
                f"{field}: checkpoint folder {shown} does not exist (complete steps under {self.path}: {available})."
            )
        if not self._is_complete_name(store, name):
            raise FileNotFoundError(
                f"{field}: {shown} is not a complete run checkpoint (a global_step_<N> folder with "
                f"{TRAINER_STATE_FILE}); it may be a save that was interrupted."
            )
        problems = self._problems(store, name)
        if problems:
            raise CheckpointError(f"{field}: {shown} is damaged and cannot be resumed from: {problems[0]}")
        return shown

    def prepare_fresh(self) -> None:
        """For resume='none' with overwrite: delete this manager's checkpoints (other files are left alone)."""
        if self._is_main and self.config.overwrite:
            for name in self._store.listdir():
                if (_STEP_RE.match(name) and self._store.isdir(name)) or name == POINTER_FILE:
                    self._store.rm(name)
        self._wait()

    # ------------------------------------------------------------------------------------------- saving
    def should_save(self, step: int, max_steps: int) -> bool:
        return step % self.config.interval == 0 or step == max_steps

    def should_export(self, step: int, max_steps: int) -> bool:
        """Whether this step exports the policy in Hugging Face format (``hf_save_interval``, and the last step)."""
        interval = self.config.hf_save_interval
        return interval is not None and (step % interval == 0 or step == max_steps)

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
        if not self._writer:
            raise RuntimeError(
                "this CheckpointManager was opened with writer=False; open one with writer=True to save."
            )
        self.wait()  # one save at a time; a failed earlier write raises here
        name = f"{STEP_PREFIX}{step}"
        staging = self._store.staging_dir(name)
        if self._is_main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        self._wait()
        save_async = self.config.save_async and self._can_snapshot(pop)
        snapshots: list[AgentState] = []
        # The previous snapshots are overwritten below; the write that read them must be over (``wait()`` above).
        assert self._pending is None, "a background write is still in flight"
        # Copies into the previous snapshot's buffers are only queued here; the writer thread does them (fenced).
        copier = HostCopier()
        for i, agent in enumerate(pop):
            if save_async:  # without an engine there is nothing collective to do: only the main process writes
                if self._is_main:
                    previous = self._snapshots.pop(i, None)
                    snapshots.append(agent.checkpoint_state(to_host=True, reuse=previous, copier=copier))
            else:
                save_agent_checkpoint(agent, staging / f"agent_{i}", lora_only=True, save_optimizer=True)
        rng_tensors, rng_json = capture_rng()
        rng_per_rank = self._gather(rng_json)  # a collective: every rank's python / numpy states, to the main
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
                    "world_size": self._world_size,
                    "rng_per_rank": rng_per_rank,
                    "extra": extra or {},
                }
            )
            if save_async:
                self._snapshots = dict(enumerate(snapshots))  # host buffers for the next save, once this write is done
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
                deferred = DeferredCopy(copier)  # from here on, optimizer steps wait for the writer's copy
                try:
                    self._pending = self._executor.submit(
                        self._write_in_background, step, staging, deferred, snapshots, rng_tensors, rng_file, state_text
                    )
                except BaseException:
                    deferred.run()  # never leave the fence waiting on a copy no thread will do
                    raise
            else:
                self._finish(step, staging, state_text)
        if not save_async:  # every rank takes the same branch, so the barriers stay paired
            self._wait()
        return self.step_dir(step)

    def _write_in_background(
        self,
        step: int,
        staging: Path,
        deferred: DeferredCopy,
        snapshots: list[AgentState],
        rng_tensors: dict[str, torch.Tensor],
        rng_file: str,
        state_text: str,
    ) -> None:
        deferred.run()  # the snapshots are complete after this (TornSnapshotError if the loop wrote too early)
        for i, snapshot in enumerate(snapshots):
            write_snapshot(snapshot, staging / f"agent_{i}")
        save_file(rng_tensors, str(staging / rng_file))
        self._finish(step, staging, state_text)

    def _finish(self, step: int, staging: Path, state_text: str) -> None:
        """Main process: publish the step folder with its trainer state last (every other file durable first),
        then the pointer, then retention; in this order."""
        self._store.publish(staging, f"{STEP_PREFIX}{step}", marker=TRAINER_STATE_FILE, marker_text=state_text)
        self._store.write_text(POINTER_FILE, f"{step}\n")
        self._retain(step)

    def _can_snapshot(self, pop: list[LLMAlgorithm]) -> bool:
        if all(agent.engine is None for agent in pop):
            return True
        warn_once(
            "save_async_deepspeed",
            "save_async: a DeepSpeed engine writes its checkpoint collectively; saving synchronously instead.",
            stacklevel=4,  # warn_once, _can_snapshot, save, the caller of save
        )
        return False

    def wait(self) -> None:
        """Block until the background write in flight (if any) is complete; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, *, raise_error: bool = True) -> None:
        """Wait for the last write, stop the writer thread and release the path's lock. ``raise_error=False``
        (for a loop that is already failing) waits without re-raising the writer's error."""
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
            if self._lock_release is not None:
                self._lock_release()

    def _retain(self, newest: int) -> None:
        """Keep the newest ``keep`` complete folders (the one just written always among them); delete older ones."""
        keep = self.config.keep
        if keep is None:
            return
        steps = [step for step in self.complete_steps() if step <= newest]
        kept = set(steps[-keep:]) | {newest}
        for step in steps:
            if step not in kept:
                self._store.rm(f"{STEP_PREFIX}{step}")

    # ------------------------------------------------------------------------------------------- loading
    def load(self, folder: str | os.PathLike, pop: list[LLMAlgorithm], env: Any | None = None) -> ResumeState:
        """Restore the population, the env's data position and the RNG states from a complete step folder.

        Adapters (actor, reference, critic), extra modules, optimizer and LR schedule come back exactly as saved:
        the saved reference is restored rather than replaced by the actor, so the KL anchor does not move. Each
        member's ``index`` is set to the one it had when saved. A remote folder is downloaded to a local
        temporary folder first (removed afterwards).
        """
        self.wait()
        store, name = self._name_of(folder)
        if not self._is_complete_name(store, name):
            raise FileNotFoundError(
                f"checkpoint: {store.location(name)} is not a complete run checkpoint (a global_step_<N> folder "
                f"with {TRAINER_STATE_FILE})."
            )
        with store.materialize(name, self._is_main, self._wait) as local:
            state = self._load_local(local, pop, env)
        return self._resume_state(state, store.location(name))

    def _load_local(self, folder: Path, pop: list[LLMAlgorithm], env: Any | None) -> dict[str, Any]:
        state_file = folder / TRAINER_STATE_FILE
        try:
            state = json.loads(state_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{state_file} cannot be read or parsed: {error}") from None
        if state.get("format_version") != RUN_FORMAT_VERSION:
            raise ValueError(
                f"{state_file} has format_version {state.get('format_version')!r}; this version reads "
                f"{RUN_FORMAT_VERSION}."
            )
        if state["num_agents"] != len(pop):
            raise ValueError(
                f"{folder} holds {state['num_agents']} agents but the population has {len(pop)}; build the same "
                "population size to resume."
            )
        agent_states = []
        for i, agent in enumerate(pop):  # read and check every member before any of them changes
            agent_dir = folder / f"agent_{i}"
            if not agent_dir.is_dir():
                raise FileNotFoundError(f"{agent_dir} is missing from a checkpoint marked complete.")
            agent_states.append(read_state(agent_dir, agent.lora_config))
        indices = state.get("agent_indices") or []
        saved_world = int(state.get("world_size", 1))
        same_world = saved_world == self._world_size
        fresh_optimizers = []  # members whose DeepSpeed optimizer state cannot follow to another world size
        for i, (agent, agent_state) in enumerate(zip(pop, agent_states, strict=True)):
            # ZeRO's optimizer state is partitioned per process and DeepSpeed cannot re-partition it for another
            # number of processes: the adapters and the LR schedule load, the optimizer starts afresh (said below).
            repartition = agent_state.payload.get("engine_checkpoint") and not same_world
            agent.load_checkpoint_state(
                agent_state,
                load_optimizer=not repartition,
                overwrite_reference_adapter=True,
                overwrite_critic_adapter=True,
            )
            if repartition:
                fresh_optimizers.append(i)
                schedule = agent_state.payload.get("lr_scheduler")
                if schedule is not None and agent.lr_scheduler is not None:
                    agent.lr_scheduler.load_state_dict(schedule)
            if i < len(indices):  # evolution renumbers members; the agent checkpoint leaves index alone
                agent.index = int(indices[i])
        if env is not None and state.get("env_state") is not None:
            env.load_state_dict(state["env_state"])
        rng_file = folder / (RNG_FILE if self._rank == 0 else f"rng_state_rank{self._rank}.safetensors")
        if not same_world or not rng_file.is_file():
            rng_file = folder / RNG_FILE  # another world size: every rank starts from the main's streams
        per_rank = state.get("rng_per_rank")
        plain = per_rank[self._rank] if same_world and per_rank and self._rank < len(per_rank) else state["rng"]
        restore_rng(load_file(str(rng_file)), plain)
        if not same_world and self._is_main:
            optimizer_note = (
                f" Members {fresh_optimizers}: their DeepSpeed optimizer state is partitioned over {saved_world} "
                f"process(es) and DeepSpeed cannot load it on {self._world_size}, so the optimizer (Adam moments) "
                "starts afresh."
                if fresh_optimizers
                else ""
            )
            warnings.warn(
                f"{folder} was saved by {saved_world} process(es) and is resumed by {self._world_size}: the adapters, "
                "the LR schedule, the data position and the optimizer state (unless DeepSpeed partitioned it) are "
                "restored, but the per-process random streams cannot be mapped onto another number of processes, so "
                "sampling (and anything random) differs from an uninterrupted run." + optimizer_note + " Resume on "
                "the same world size for an exact continuation.",
                UserWarning,
                stacklevel=3,
            )
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
        when fresh. The same (verified) folder that ``restore`` loads.

        Read it before building the logger to continue the same W&B run:
        ``wandb_kwargs={"id": info.wandb_run_id, "resume": "allow"}``.
        """
        folder = None if self.config.resume == "none" else self.resume_dir()
        if folder is None:
            return None
        store, name = self._name_of(folder)
        text = store.read_text(f"{name}/{TRAINER_STATE_FILE}")
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
