"""The on-disk format of one agent checkpoint: file names, atomic folder writes, and reading files with checks.

``agent.py`` decides what goes into a checkpoint and how it is applied to a live agent; this module owns
how the pieces are written and read back: PEFT adapter folders, ``attributes.pt`` (plain data only, read
with ``weights_only=True``), the staging folder renamed into place, and errors that name the bad file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from agilerl_llm.model.adapters import lora_config_differences

ATTRIBUTES_FILE = "attributes.pt"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ENGINE_DIR = "save_checkpoint"
MODULES_DIR = "modules"  # <name>.safetensors for each extra module (PPO's value head)
# 2: extra modules as safetensors files, the base-model fingerprint. Version 1 checkpoints still load.
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this agent: corrupt, unsafe, or made for another model/config."""


def write_adapter(folder: Path, weights: dict[str, torch.Tensor], lora_config: Any) -> None:
    """PEFT's adapter folder: loadable with ``PeftModel.from_pretrained(base, folder)``."""
    folder.mkdir()
    save_file(weights, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    lora_config.save_pretrained(str(folder))
    fsync_file(folder / ADAPTER_WEIGHTS_FILE)
    fsync_file(folder / ADAPTER_CONFIG_FILE)


def save_torch(payload: dict[str, Any], file: Path) -> None:
    torch.save(payload, file)
    fsync_file(file)


def write_tensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    fsync_file(file)


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the checkpoint (attributes.pt lists it).")
    try:
        return load_file(str(file))
    except Exception as error:  # safetensors raises SafetensorError for truncated or damaged files
        raise CheckpointError(f"{file} is truncated or corrupt and cannot be read: {error}") from None


def fsync_file(file: Path) -> None:
    """Force a written file's data to disk (a crash after this cannot leave it empty or partial)."""
    descriptor = os.open(file, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_dir(folder: Path) -> None:
    """Force a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first): all of it is on disk afterwards,
    whoever wrote it (our writers, PEFT's config writer, DeepSpeed's engine)."""
    folders = [folder]
    for entry in sorted(folder.rglob("*")):
        if entry.is_symlink():
            continue
        if entry.is_file():
            fsync_file(entry)
        elif entry.is_dir():
            folders.append(entry)
    for sub in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(sub)


def check_target(path: Path) -> None:
    """Refuse to replace anything but an earlier agent checkpoint (never a user's folder)."""
    if path.is_file() or path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a folder; choose another checkpoint path.")
    if path.is_dir() and any(path.iterdir()) and not (path / ATTRIBUTES_FILE).is_file():
        raise FileExistsError(
            f"{path} is a non-empty folder without {ATTRIBUTES_FILE}, so not an agent checkpoint; refusing to "
            "replace it. Choose a new or empty folder."
        )


def publish(staging: Path, path: Path) -> None:
    """Move the complete ``staging`` folder to ``path``; an older checkpoint there is deleted only afterwards.

    Everything in ``staging`` is fsynced first, and the parent folder after the rename, so the published folder
    is on disk whole before anyone (the run manager's completeness marker, its pointer) refers to it."""
    fsync_tree(staging)
    rename_into_place(staging, path)


def rename_into_place(staging: Path, path: Path) -> None:
    """Rename the folder ``staging`` to ``path`` (atomic), then fsync the parent. A folder already at ``path`` is
    moved aside to ``.<name>.replaced`` first and deleted only once the new one is in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.rename(staging, path)
        fsync_dir(path.parent)
        return
    replaced = path.with_name(f".{path.name}.replaced")
    remove_folder(replaced)
    os.rename(path, replaced)
    os.rename(staging, path)
    fsync_dir(path.parent)
    remove_folder(replaced)


def write_text_durably(file: Path, text: str) -> None:
    """Write ``text`` to ``file`` and force it to disk before returning."""
    with open(file, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def remove_folder(folder: Path) -> None:
    if folder.is_dir():
        shutil.rmtree(folder)


def read_attributes(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        replaced = path.with_name(f".{path.name}.replaced")
        hint = f" An interrupted save left the previous checkpoint at {replaced}." if replaced.is_dir() else ""
        raise FileNotFoundError(f"No agent checkpoint folder at {path}.{hint}")
    file = path / ATTRIBUTES_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {path} is not a complete agent checkpoint.")
    with open(file, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is damage, not a pickle to refuse
        raise CheckpointError(
            f"{file} is not a torch checkpoint archive (it does not start like a zip file): it is truncated or "
            "corrupt. Resume from another checkpoint."
        )
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower() and "unsupported global" not in str(error).lower():
            raise CheckpointError(f"{file} is truncated or corrupt and cannot be read: {error}") from None
        raise CheckpointError(
            f"{file} holds objects other than tensors and plain Python data; refusing to unpickle it, since that "
            f"could run arbitrary code. Only load checkpoints written by save_checkpoint. ({error})"
        ) from None
    except Exception as error:  # torch raises RuntimeError / EOFError / zipfile errors for damaged archives
        raise CheckpointError(f"{file} is truncated or corrupt and cannot be read: {error}") from None
    required = ("format_version", "attributes", "lora_config", "base_shapes", "lora_only", "engine_checkpoint")
    if not isinstance(saved, dict) or any(key not in saved for key in required):
        raise CheckpointError(f"{file} is not an agilerl_llm agent checkpoint (expected keys {list(required)}).")
    if saved["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format_version={saved['format_version']}, newer than this release reads ({FORMAT_VERSION}); "
            "upgrade agilerl_llm."
        )
    saved.setdefault("modules", {})  # version 1 had no extra modules and no fingerprint
    saved.setdefault("base_fingerprint", None)
    return saved


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter folder's parsed adapter_config.json and its weights (compare the config with
    ``check_lora_config``)."""
    config_file, weights_file = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the checkpoint.")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is corrupt and cannot be parsed: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is corrupt: expected a JSON object.")
    try:
        return config, load_file(str(weights_file))
    except Exception as error:  # safetensors raises SafetensorError for truncated or damaged files
        raise CheckpointError(f"{weights_file} is truncated or corrupt and cannot be read: {error}") from None


def plain_lora_config(config: Any) -> dict[str, Any]:
    """The LoRA config as JSON-like data (sets become sorted lists, enums their values)."""

    def default(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, Enum):
            return value.value
        return str(value)

    return json.loads(json.dumps(config.to_dict(), default=default))


def check_lora_config(saved: dict[str, Any], live: Any, source: Path) -> None:
    differences = lora_config_differences(SimpleNamespace(**saved), live)
    if differences:
        raise CheckpointError(
            f"The checkpoint's LoRA config ({source}) does not match this agent's: {'; '.join(differences)}. "
            "Re-create the agent with lora_config=LoraConfig(...) set to the checkpoint's values (see its "
            "adapter_config.json), then load."
        )


def compare_shapes(saved: dict[str, tuple[int, ...]], live: dict[str, tuple[int, ...]], file: Path) -> None:
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}. It was made for "
            "another base model or LoRA config."
        )
    for key, shape in saved.items():
        if shape != live[key]:
            raise CheckpointError(
                f"{file}: {key!r} has shape {shape} but the live adapter has {live[key]}: the checkpoint was made "
                "for another base model or LoRA rank."
            )
