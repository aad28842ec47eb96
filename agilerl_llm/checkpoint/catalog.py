"""Inspect run checkpoints on disk: list the step folders of a run and verify that they can be read back.

Both work on the layout ``CheckpointManager`` writes (see ``agilerl_llm.checkpoint.run``), in a local folder or
at an fsspec URL (``s3://``, ``gs://``, ``memory://``...; ``storage_options`` as for ``CheckpointConfig``). Listing
a URL reads only the listing and the latest pointer; verifying one downloads the step folders it checks into a
temporary local folder (removed afterwards) and names the remote files in its problems. Nothing here changes a
file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from agilerl_llm.checkpoint.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ATTRIBUTES_FILE
from agilerl_llm.checkpoint.run import POINTER_FILE, RNG_FILE, STEP_PREFIX, TRAINER_STATE_FILE, CheckpointManager
from agilerl_llm.checkpoint.storage import RemoteStore, basename, is_remote, normalize_location
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
        folder: its path (a hidden ``.global_step_<N>.incomplete`` folder for an interrupted save); a URL string
            for a run on an fsspec filesystem.
        size: bytes of all files below it.
        complete: it has its final name and ``trainer_state.json`` (written last), so a resume may use it.
        is_latest: it is the step a resume with resume="latest" would continue from.
    """

    step: int
    folder: Path | str
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


def run_location(path: str | os.PathLike) -> Path | str:
    """``path`` as a local ``Path`` (``file://`` stripped) or a remote URL string (its protocol checked)."""
    text = os.fspath(path)
    if is_remote(text):
        return normalize_location(text, "path")
    return local_run_path(text)


def list_checkpoints(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> list[StepInfo]:
    """Every step folder under the run folder ``path``, complete or not, ascending by step (complete first on
    ties, e.g. a leftover ``.global_step_<N>.incomplete`` next to the finished ``global_step_<N>``).

    ``path`` may be a URL (``storage_options`` for its filesystem): then one recursive listing gives the folders,
    their sizes and which are complete, and only the latest pointer file is read."""
    location = run_location(path)
    if isinstance(location, str):
        return _list_remote(RemoteStore(location, storage_options))
    path = location
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
    return _sorted(found)


def _sorted(found: list[StepInfo]) -> list[StepInfo]:
    return sorted(found, key=lambda info: (info.step, not info.complete, basename(info.folder)))


def _list_remote(store: RemoteStore) -> list[StepInfo]:
    if not store.exists():
        raise FileNotFoundError(f"No run checkpoint folder at {store.url}.")
    store.fs.invalidate_cache()
    root = store.full().rstrip("/") + "/"
    sizes: dict[str, int] = {}
    marked: set[str] = set()
    for file, info in store.fs.find(store.full(), detail=True).items():
        relative = file[len(root) :] if file.startswith(root) else None
        if not relative or "/" not in relative or info.get("type") == "directory":
            continue
        folder, rest = relative.split("/", 1)
        sizes[folder] = sizes.get(folder, 0) + int(info.get("size") or 0)
        if rest == TRAINER_STATE_FILE:
            marked.add(folder)
    complete_steps = sorted(int(m.group(1)) for name in marked if (m := _STEP_RE.match(name)))
    latest = _pick_latest(store.read_text(POINTER_FILE), complete_steps)
    found = []
    for name, size in sizes.items():
        match = _STEP_RE.match(name) or _TEMP_STEP_RE.match(name)
        if match is None:
            continue
        step = int(match.group(1))
        complete = _STEP_RE.match(name) is not None and name in marked
        found.append(StepInfo(step, store.url_of(name), size, complete, complete and step == latest))
    return _sorted(found)


def _pick_latest(pointer_text: str | None, complete_steps: list[int]) -> int | None:
    """The pointer's step when it names a complete folder, else the newest complete step."""
    try:
        step = int((pointer_text or "").strip())
    except ValueError:
        step = None
    if step is not None and step in complete_steps:
        return step
    return complete_steps[-1] if complete_steps else None


@contextmanager
def remote_download(url: str, names: list[str], storage_options: dict[str, Any] | None = None) -> Iterator[Path]:
    """A temporary local folder holding the files and folders ``names`` (relative to ``url``; missing ones are
    skipped), removed on exit."""
    store = RemoteStore(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="agilerl_llm_ckpt_") as temp:
        local = Path(temp) / basename(url)
        local.mkdir()
        for name in names:
            if store.isfile(name):
                target = local / name
                target.parent.mkdir(parents=True, exist_ok=True)
                store.fs.get_file(store.full(name), str(target))
            elif store.exists(name):
                store.get_dir(name, local / name)
        yield local


def verify_checkpoint(
    path: str | os.PathLike, step: int | None = None, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Problems that would stop a resume or an export; an empty list means everything checked is readable.

    ``path`` is a run folder (every complete step folder is checked, plus the latest pointer) or one
    ``global_step_<N>`` folder. ``step`` picks one step of a run folder. Each problem names the file concerned.
    Checked: trainer_state.json parses and has the expected keys; every ``agent_<i>`` it lists exists;
    attributes.pt loads with ``torch.load(weights_only=True)``; every adapter folder has a valid
    adapter_config.json and an adapter_model.safetensors whose tensors all read; the RNG files read; the
    pointer names a complete folder.

    A URL ``path`` (``storage_options`` for its filesystem) is downloaded first: the step folder checked, or
    every complete step folder and the pointer of a run, into a temporary local folder; problems name the
    remote files.
    """
    location = run_location(path)
    if isinstance(location, str):
        return _verify_remote(location, step, storage_options)
    path = location
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


def _verify_remote(url: str, step: int | None, storage_options: dict[str, Any] | None) -> list[str]:
    store = RemoteStore(url, storage_options)
    if _STEP_RE.match(basename(url)) and step is None:
        if not store.exists():
            return [f"{url}: no such step folder."]
        if not store.isfile(TRAINER_STATE_FILE):
            return [f"{url}: incomplete step folder ({TRAINER_STATE_FILE} is missing; an interrupted save?)."]
        parent, name = url.rsplit("/", 1)
        with remote_download(parent, [name], storage_options) as local:
            return _to_remote(verify_checkpoint(local / name), local, parent)
    if not store.exists():
        return [f"{url}: no such run folder."]
    complete = [info.step for info in _list_remote(store) if info.complete]
    if step is not None:
        name = f"{STEP_PREFIX}{step}"
        if not store.exists(name):
            return [f"{store.url_of(name)}: no such step folder (complete steps: {complete})."]
        if step not in complete:
            return [
                f"{store.url_of(name)}: incomplete step folder ({TRAINER_STATE_FILE} is missing; an interrupted save?)."
            ]
        with remote_download(url, [name], storage_options) as local:
            return _to_remote(_verify_step(local / name), local, url)
    names = [f"{STEP_PREFIX}{s}" for s in complete] + [POINTER_FILE]
    with remote_download(url, names, storage_options) as local:
        return _to_remote(verify_checkpoint(local), local, url)


def _to_remote(problems: list[str], local: Path, url: str) -> list[str]:
    """Problems with the temporary local folder ``local`` replaced by the URL it was downloaded from."""
    return [problem.replace(str(local), url.rstrip("/")) for problem in problems]


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
        pointer_text = (path / POINTER_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        pointer_text = None
    return _pick_latest(pointer_text, _complete_steps(path))


def _folder_size(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file() and not file.is_symlink())


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
