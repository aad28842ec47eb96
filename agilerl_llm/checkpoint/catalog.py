"""Inspect run checkpoints on disk: list the step folders of a run and verify that they can be read back.

Both work on the layout ``CheckpointManager`` writes (see ``agilerl_llm.checkpoint.run``) and on local folders
only. Nothing here changes a file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from agilerl_llm.checkpoint.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ATTRIBUTES_FILE
from agilerl_llm.checkpoint.run import POINTER_FILE, RNG_FILE, STEP_PREFIX, TRAINER_STATE_FILE, CheckpointManager
from agilerl_llm.model.adapters import ADAPTER_NAMES

# Keys every trainer_state.json holds (written by CheckpointManager.save).
TRAINER_STATE_KEYS = ("format_version", "global_step", "samples_seen", "num_agents", "rng")
# Keys every attributes.pt holds (see agilerl_llm.checkpoint.files.read_attributes).
ATTRIBUTE_KEYS = ("format_version", "attributes", "lora_config", "base_shapes", "lora_only", "engine_checkpoint")

_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
_TEMP_STEP_RE = re.compile(rf"^\.{STEP_PREFIX}(\d+)\.(incomplete|replaced)$")
_REMOTE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class StepInfo:
    """One step folder of a run.

    Attributes:
        step: the global step in its name.
        folder: its path (a hidden ``.global_step_<N>.incomplete`` folder for an interrupted save).
        size: bytes of all files below it.
        complete: it has its final name and ``trainer_state.json`` (written last), so a resume may use it.
        is_latest: it is the step a resume with resume="latest" would continue from.
    """

    step: int
    folder: Path
    size: int
    complete: bool
    is_latest: bool


def local_run_path(path: str | os.PathLike) -> Path:
    """``path`` as a local ``Path``; a URL (s3://, gs://, ...) is refused with what to do instead."""
    text = os.fspath(path)
    if _REMOTE_RE.match(text) and not text.startswith("file://"):
        raise ValueError(
            f"{text} is not a local folder: checkpoints list/verify/export work on local folders; copy the run down "
            "first (e.g. `aws s3 sync` / `gsutil rsync` into a local folder)."
        )
    return Path(text.removeprefix("file://"))


def list_checkpoints(path: str | os.PathLike) -> list[StepInfo]:
    """Every step folder under the run folder ``path``, complete or not, ascending by step (complete first on
    ties, e.g. a leftover ``.global_step_<N>.incomplete`` next to the finished ``global_step_<N>``)."""
    path = local_run_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No run checkpoint folder at {path}.")
    latest = _latest_step(path)
    found = []
    for entry in path.iterdir():
        if not entry.is_dir():
            continue
        match = _STEP_RE.match(entry.name) or _TEMP_STEP_RE.match(entry.name)
        if match is None:
            continue
        step = int(match.group(1))
        complete = CheckpointManager.is_complete(entry)
        found.append(StepInfo(step, entry, _folder_size(entry), complete, complete and step == latest))
    return sorted(found, key=lambda info: (info.step, not info.complete, info.folder.name))


def verify_checkpoint(path: str | os.PathLike, step: int | None = None) -> list[str]:
    """Problems that would stop a resume or an export; an empty list means everything checked is readable.

    ``path`` is a run folder (every complete step folder is checked, plus the latest pointer) or one
    ``global_step_<N>`` folder. ``step`` picks one step of a run folder. Each problem names the file concerned.
    Checked: trainer_state.json parses and has the expected keys; every ``agent_<i>`` it lists exists;
    attributes.pt loads with ``torch.load(weights_only=True)``; every adapter folder has a valid
    adapter_config.json and an adapter_model.safetensors whose tensors all read; the RNG files read; the
    pointer names a complete folder.
    """
    path = local_run_path(path)
    if _STEP_RE.match(path.name) and step is None:
        if not path.is_dir():
            return [f"{path}: no such step folder."]
        if not CheckpointManager.is_complete(path):
            return [f"{path}: incomplete step folder ({TRAINER_STATE_FILE} is missing; an interrupted save?)."]
        return _verify_step(path)
    if not path.is_dir():
        return [f"{path}: no such run folder."]
    if step is not None:
        folder = path / f"{STEP_PREFIX}{step}"
        if not folder.is_dir():
            return [f"{folder}: no such step folder (complete steps: {_complete_steps(path)})."]
        if not CheckpointManager.is_complete(folder):
            return [f"{folder}: incomplete step folder ({TRAINER_STATE_FILE} is missing; an interrupted save?)."]
        return _verify_step(folder)
    problems = []
    steps = _complete_steps(path)
    if not steps:
        problems.append(f"{path}: no complete {STEP_PREFIX}<N> folder.")
    for complete_step in steps:
        problems.extend(_verify_step(path / f"{STEP_PREFIX}{complete_step}"))
    problems.extend(_verify_pointer(path, steps))
    return problems


# ---------------------------------------------------------------------------------------------- checks
def _verify_step(folder: Path) -> list[str]:
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
    elif not lora_only:
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
def _complete_steps(path: Path) -> list[int]:
    return sorted(
        int(match.group(1))
        for entry in path.iterdir()
        if (match := _STEP_RE.match(entry.name)) and CheckpointManager.is_complete(entry)
    )


def _latest_step(path: Path) -> int | None:
    """The step a resume would pick: the pointer's when it names a complete folder, else the newest complete."""
    try:
        step = int((path / POINTER_FILE).read_text().strip())
    except (OSError, UnicodeDecodeError, ValueError):
        step = None
    if step is not None and CheckpointManager.is_complete(path / f"{STEP_PREFIX}{step}"):
        return step
    steps = _complete_steps(path)
    return steps[-1] if steps else None


def _folder_size(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file() and not file.is_symlink())


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
