"""Inspect run checkpoints: list the step folders of a run and verify that they can be read back.

Both work on the layout ``CheckpointManager`` writes (see ``agilerl_llm.checkpoint.run``), in a local folder or
at an fsspec URL (``s3://``, ``gs://``, ``memory://``...; ``storage_options`` as for ``CheckpointConfig``), through
one ``storage.Store``. Listing reads the listing and the latest pointer, and verifies the newest steps until one
reads back whole (that is the step a resume would pick; a damaged newer one is listed as damaged). Verifying
reads every file of the step folders it checks (downloaded into a temporary local folder for a URL, removed
afterwards); problems name the files. Nothing here changes a file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from agilerl_llm.checkpoint.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ATTRIBUTES_FILE, MODULES_DIR
from agilerl_llm.checkpoint.run import POINTER_FILE, RNG_FILE, STEP_PREFIX, TRAINER_STATE_FILE, resume_order
from agilerl_llm.checkpoint.storage import Store, normalize_location
from agilerl_llm.model.adapters import ADAPTER_NAMES

# Keys every trainer_state.json holds (written by CheckpointManager.save).
TRAINER_STATE_KEYS = ("format_version", "global_step", "samples_seen", "num_agents", "rng")
# Keys every attributes.pt holds (see agilerl_llm.checkpoint.files.read_attributes).
ATTRIBUTE_KEYS = ("format_version", "attributes", "lora_config", "base_shapes", "lora_only", "engine_checkpoint")

_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
_TEMP_STEP_RE = re.compile(rf"^\.{STEP_PREFIX}(\d+)\.(incomplete|replaced)$")


@dataclass(frozen=True)
class StepInfo:
    """One step folder of a run.

    Attributes:
        step: the global step in its name.
        folder: its path (a hidden ``.global_step_<N>.incomplete`` folder for an interrupted save); a URL string
            for a run on an fsspec filesystem.
        size: bytes of all files below it.
        complete: it has its final name and ``trainer_state.json`` (written last).
        is_latest: it is the step a resume with resume="latest" would continue from.
        problem: why a complete step that a resume would skip cannot be read back (None when it verified or was
            not checked: only steps newer than the latest are).
    """

    step: int
    folder: Path | str
    size: int
    complete: bool
    is_latest: bool
    problem: str | None = None


def run_store(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Store:
    """The store of a run folder or step folder given as a local path or URL (its protocol checked)."""
    location = normalize_location(path if isinstance(path, Path) else os.fspath(path), "path")
    return Store(location, storage_options)


def list_checkpoints(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> list[StepInfo]:
    """Every step folder under the run folder ``path``, complete or not, ascending by step (complete first on
    ties, e.g. a leftover ``.global_step_<N>.incomplete`` next to the finished ``global_step_<N>``).

    ``is_latest`` marks the step a resume picks: the pointer's (else the newest) complete step that verifies;
    newer complete steps that do not verify carry their ``problem``."""
    store = run_store(path, storage_options)
    if not store.isdir():
        raise FileNotFoundError(f"No run checkpoint folder at {store.location()}.")
    sizes: dict[str, int] = {}
    marked: set[str] = set()
    for relative, size in store.files().items():
        if "/" not in relative:
            continue
        folder, rest = relative.split("/", 1)
        sizes[folder] = sizes.get(folder, 0) + size
        if rest == TRAINER_STATE_FILE:
            marked.add(folder)
    for name in store.listdir():  # empty folders too
        if (_STEP_RE.match(name) or _TEMP_STEP_RE.match(name)) and store.isdir(name):
            sizes.setdefault(name, 0)
    complete_steps = sorted(int(m.group(1)) for name in marked if (m := _STEP_RE.match(name)))
    latest, problems = _resumable_step(store, store.read_text(POINTER_FILE), complete_steps)
    found = []
    for name, size in sizes.items():
        match = _STEP_RE.match(name) or _TEMP_STEP_RE.match(name)
        if match is None:
            continue
        step = int(match.group(1))
        complete = _STEP_RE.match(name) is not None and name in marked
        problem = problems.get(step) if complete else None
        found.append(StepInfo(step, store.location(name), size, complete, complete and step == latest, problem))
    return sorted(found, key=lambda info: (info.step, not info.complete, os.fspath(info.folder)))


def _resumable_step(
    store: Store, pointer_text: str | None, complete_steps: list[int]
) -> tuple[int | None, dict[int, str]]:
    """The step a resume picks (pointer first, then newest first; the first that verifies) and the problems of
    the steps it skipped."""
    ordered = resume_order(pointer_text, complete_steps)
    problems: dict[int, str] = {}
    for step in ordered:
        name = f"{STEP_PREFIX}{step}"
        with store.materialize_some([name]) as local:
            found = store.shows(local, verify_step_folder(local / name))
        if not found:
            return step, problems
        problems[step] = found[0]
    return None, problems


def verify_checkpoint(
    path: str | os.PathLike, step: int | None = None, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Problems that would stop a resume or an export; an empty list means everything checked is readable.

    ``path`` is a run folder (every complete step folder is checked, plus the latest pointer) or one
    ``global_step_<N>`` folder (a local path or a URL, ``storage_options`` for its filesystem). ``step`` picks
    one step of a run folder. Each problem names the file concerned. Checked: trainer_state.json parses and has
    the expected keys; every ``agent_<i>`` it lists exists; attributes.pt loads with
    ``torch.load(weights_only=True)``; every adapter folder has a valid adapter_config.json and an
    adapter_model.safetensors whose tensors all read; module files read; the RNG files read; the pointer names a
    complete folder.
    """
    store = run_store(path, storage_options)
    location = store.location()
    if _STEP_RE.match(os.fspath(location).rstrip("/").rsplit("/", 1)[-1]) and step is None:
        if not store.isdir():
            return [f"{location}: no such step folder."]
        if not store.isfile(TRAINER_STATE_FILE):
            return [f"{location}: incomplete step folder ({TRAINER_STATE_FILE} is missing; an interrupted save?)."]
        with store.materialize() as local:
            return store.shows(local, verify_step_folder(local))
    if not store.isdir():
        return [f"{location}: no such run folder."]
    complete = [info.step for info in list_checkpoints(path, storage_options) if info.complete]
    if step is not None:
        name = f"{STEP_PREFIX}{step}"
        if not store.isdir(name):
            return [f"{store.location(name)}: no such step folder (complete steps: {complete})."]
        if step not in complete:
            return [
                f"{store.location(name)}: incomplete step folder ({TRAINER_STATE_FILE} is missing; an interrupted "
                "save?)."
            ]
        with store.materialize_some([name]) as local:
            return store.shows(local, verify_step_folder(local / name))
    problems = []
    if not complete:
        problems.append(f"{location}: no complete {STEP_PREFIX}<N> folder.")
    names = [f"{STEP_PREFIX}{s}" for s in complete]
    with store.materialize_some([*names, POINTER_FILE]) as local:
        for name in names:
            problems.extend(store.shows(local, verify_step_folder(local / name)))
        problems.extend(store.shows(local, _verify_pointer(local, complete)))
    return problems


# ---------------------------------------------------------------------------------------------- checks
def verify_step_folder(folder: Path) -> list[str]:
    """Problems of one local step folder (every file read back); empty when it can be resumed from."""
    problems: list[str] = []
    state_file = folder / TRAINER_STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"{state_file}: cannot be read or parsed: {error}"]
    if not isinstance(state, dict):
        return [f"{state_file}: expected a JSON object."]
    missing = [key for key in TRAINER_STATE_KEYS if key not in state]
    if missing:
        problems.append(f"{state_file}: missing keys {missing}.")
    num_agents = state.get("num_agents")
    if not isinstance(num_agents, int) or num_agents < 1:
        problems.append(f"{state_file}: num_agents is {num_agents!r}, expected a positive integer.")
        num_agents = 0
    for i in range(num_agents):
        agent_dir = folder / f"agent_{i}"
        if not agent_dir.is_dir():
            problems.append(f"{agent_dir}: missing (trainer_state.json lists {num_agents} agents).")
            continue
        problems.extend(_verify_agent(agent_dir))
    rng_files = sorted(folder.glob("rng_state*.safetensors"))
    if not (folder / RNG_FILE).is_file():
        problems.append(f"{folder / RNG_FILE}: missing.")
    for rng_file in rng_files:
        problems.extend(_verify_safetensors(rng_file))
    return problems


def _verify_agent(agent_dir: Path) -> list[str]:
    problems: list[str] = []
    file = agent_dir / ATTRIBUTES_FILE
    saved = None
    if not file.is_file():
        problems.append(f"{file}: missing.")
    else:
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling refused, truncated zip, ...
            problems.append(f"{file}: cannot be loaded with torch.load(weights_only=True): {_first_line(error)}")
    if saved is not None:
        missing = [key for key in ATTRIBUTE_KEYS if key not in saved] if isinstance(saved, dict) else ATTRIBUTE_KEYS
        if missing:
            problems.append(f"{file}: not an agent checkpoint (missing keys {list(missing)}).")
    adapters = saved.get("adapters") if isinstance(saved, dict) else None
    lora_only = saved.get("lora_only", True) if isinstance(saved, dict) else True
    if adapters is None:  # attributes unreadable: check whatever adapter folders are there
        adapters = sorted(p.name for p in agent_dir.iterdir() if p.is_dir() and p.name in ADAPTER_NAMES)
    modules = saved.get("modules") if isinstance(saved, dict) else None
    for module in modules or {}:
        problems.extend(_verify_safetensors(agent_dir / MODULES_DIR / f"{module}.safetensors"))
    if isinstance(saved, dict) and not lora_only:
        return problems  # a full checkpoint keeps its weights in attributes.pt (already read)
    for name in adapters:
        problems.extend(_verify_adapter(agent_dir / name))
    return problems


def _verify_adapter(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [f"{folder}: adapter folder missing."]
    problems = []
    config_file = folder / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        problems.append(f"{config_file}: missing.")
    else:
        try:
            json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(f"{config_file}: not valid JSON: {error}")
    weights_file = folder / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        problems.append(f"{weights_file}: missing.")
    else:
        problems.extend(_verify_safetensors(weights_file))
    return problems


def _verify_safetensors(file: Path) -> list[str]:
    """Open the file and read every tensor (a truncated file fails on the header or on a tensor)."""
    if not file.is_file():
        return [f"{file}: missing."]
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    except Exception as error:
        return [f"{file}: truncated or corrupt, cannot be read with safetensors: {_first_line(error)}"]
    return []


def _verify_pointer(path: Path, complete: list[int]) -> list[str]:
    pointer = path / POINTER_FILE
    if not pointer.is_file():
        return [f"{pointer}: missing (a resume falls back to the newest complete folder)."] if complete else []
    try:
        step = int(pointer.read_text().strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return [f"{pointer}: does not hold a step number."]
    if step not in complete:
        return [f"{pointer}: names step {step}, which is not a complete {STEP_PREFIX}<N> folder."]
    return []


# ---------------------------------------------------------------------------------------------- helpers
def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
