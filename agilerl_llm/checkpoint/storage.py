"""Where run checkpoints live: a local folder, or any fsspec filesystem (``s3://``, ``gs://``, ``memory://``...).

Local folders keep the write-rename-fsync protocol of ``run.py``. A remote location goes through ``RemoteStore``:
a step folder is first written completely into a local staging folder by the same writers, then uploaded file by
file with ``trainer_state.json`` last (object stores have no atomic rename of a folder; the last object is the
completeness marker instead). Loading downloads a step folder into a local folder and reads it from there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs

_LOCAL_PROTOCOLS = {None, "file", "local"}
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_remote(location: str | os.PathLike | None) -> bool:
    """True for an fsspec URL of a non-local filesystem; False for plain paths and ``file://`` URLs."""
    if location is None or isinstance(location, Path):
        return False
    protocol, _ = split_protocol(str(location))
    return protocol not in _LOCAL_PROTOCOLS


def normalize_location(value: Any, field: str) -> Any:
    """A config value as ``Path`` (local, ``file://`` stripped) or a URL string (remote, checked to be usable).

    Raises:
        ValueError: naming ``field``, when fsspec does not know the protocol or its package is not installed.
    """
    if value is None or isinstance(value, Path) or not isinstance(value, str):
        return value
    protocol, rest = split_protocol(value)
    if protocol in _LOCAL_PROTOCOLS:
        return Path(rest)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as error:
        extra = _EXTRAS.get(protocol)
        hint = f'pip install "agilerl-llm[{extra}]"' if extra else f"install the fsspec implementation ({error})"
        raise ValueError(f"{field}: {value!r} needs the filesystem package for {protocol}://; {hint}.") from error
    except ValueError as error:
        raise ValueError(
            f"{field}: fsspec does not know the protocol {protocol!r} of {value!r}; use a local path or a URL such "
            'as s3://bucket/run (pip install "agilerl-llm[s3]") or gs://bucket/run (pip install "agilerl-llm[gcs]").'
        ) from error
    return value.rstrip("/")


def join(location: str | Path, name: str) -> str | Path:
    """``location / name`` for a local ``Path`` or a URL string."""
    return location / name if isinstance(location, Path) else f"{str(location).rstrip('/')}/{name}"


def basename(location: str | Path) -> str:
    return location.name if isinstance(location, Path) else str(location).rstrip("/").rsplit("/", 1)[-1]


def local_work_dir(url: str) -> Path:
    """A local folder for staging and downloads of one remote location; the same in every process on a node, so
    collective writers (DeepSpeed) and several ranks see one staging folder, as they do with a local ``path``."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"agilerl_llm_checkpoint_{digest}"


class RemoteStore:
    """An fsspec filesystem and a root folder on it; every name below is relative to the root ("" is the root).

    Listings are refreshed before each read of metadata: another process (or another filesystem instance) may
    have changed the store since fsspec cached a listing.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")

    def sub(self, name: str) -> RemoteStore:
        """The store rooted at the folder ``name`` below this one, on the same filesystem."""
        store = object.__new__(RemoteStore)
        store.url, store.fs, store.root = self.url_of(name), self.fs, self.full(name)
        return store

    def full(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def url_of(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def _refresh(self) -> None:
        self.fs.invalidate_cache()

    def exists(self, name: str = "") -> bool:
        self._refresh()
        return self.fs.exists(self.full(name))

    def isfile(self, name: str) -> bool:
        self._refresh()
        return self.fs.isfile(self.full(name))

    def listdir(self, name: str = "") -> list[str]:
        """Names directly under ``name`` (empty when it does not exist)."""
        self._refresh()
        try:
            entries = self.fs.ls(self.full(name), detail=False)
        except FileNotFoundError:
            return []
        prefix = self.full(name).rstrip("/") + "/"
        names = {entry.rstrip("/")[len(prefix) :] for entry in entries if entry.rstrip("/").startswith(prefix)}
        return sorted(n for n in names if n and "/" not in n)

    def read_text(self, name: str) -> str | None:
        """The object's text, or None when it is missing."""
        try:
            return self.fs.cat_file(self.full(name)).decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        """One object in one request: readers see the old or the new content, never a part."""
        self.fs.pipe_file(self.full(name), text.encode())

    def rm(self, name: str) -> None:
        """Delete a file or a whole folder; missing is fine."""
        self._refresh()
        path = self.full(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self._refresh()

    def put_dir(self, local: Path, name: str, last: str) -> None:
        """Upload every file under ``local`` into ``name``; the file ``last`` (relative to ``local``) goes up only
        after all the others are stored."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        first = [p for p in files if p.relative_to(local).as_posix() != last]
        if first:
            self.fs.put(
                [str(p) for p in first], [self.full(f"{name}/{p.relative_to(local).as_posix()}") for p in first]
            )
        if (local / last).is_file():
            self.fs.put_file(str(local / last), self.full(f"{name}/{last}"))
        self._refresh()

    def replace_folder(self, staging: Path, name: str, last: str) -> None:
        """Upload the local folder ``staging`` as ``name`` with the marker file ``last`` stored last, then delete
        ``staging``.

        A folder ``name`` that already exists (a re-run from an earlier step over a complete folder of the same
        step) first loses its marker, so it reads as incomplete, and is then deleted before the new files go up.
        This is safe: from that moment until the new marker lands the step is simply not a checkpoint, so a crash
        in between resumes from the newest other complete folder (and the next start removes the leftover); no
        reader ever sees old and new files mixed under a marker. The old folder belonged to the abandoned future
        of this run, which the new save replaces anyway.
        """
        if self.exists(name):
            self.rm(f"{name}/{last}")
            self.rm(name)  # stale files the new save would not overwrite (e.g. fewer ranks) go too
        self.put_dir(staging, name, last=last)
        shutil.rmtree(staging, ignore_errors=True)
        with suppress(OSError):  # the node-local work folder too, once empty
            staging.parent.rmdir()

    def remove_incomplete(self, pattern: re.Pattern, marker: str) -> list[str]:
        """Delete every folder whose name matches ``pattern`` and that lacks ``marker`` (an interrupted upload);
        returns their URLs."""
        removed = []
        for name in self.listdir():
            if pattern.match(name) and not self.isfile(f"{name}/{marker}"):
                self.rm(name)
                removed.append(self.url_of(name))
        return removed

    def get_dir(self, name: str, local: Path) -> None:
        """Download every file under ``name`` into the local folder ``local`` (created; replaced if present)."""
        self._refresh()
        base = self.full(name).rstrip("/") + "/"
        remote = [path for path in self.fs.find(self.full(name)) if path.startswith(base)]
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        targets = [local / path[len(base) :] for path in remote]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        if remote:
            self.fs.get(remote, [str(target) for target in targets])


@contextmanager
def local_copy(
    folder: Path | str, store: RemoteStore | None, is_main: bool, wait: Callable[[], None]
) -> Iterator[Path]:
    """A local folder with the content of ``folder``: itself when local; otherwise downloaded by the main process
    (``store`` rooted at ``folder``) into a node-local temporary folder that every process reads, and removed
    after all of them are done (``wait`` is the barrier)."""
    if store is None:
        yield Path(folder)
        return
    work = local_work_dir(store.url)
    local = work / basename(store.url)
    if is_main:
        store.get_dir("", local)
    wait()
    try:
        yield local
    finally:
        wait()
        if is_main:
            shutil.rmtree(work, ignore_errors=True)


def write_json_durably(file: Path, text: str) -> None:
    with open(file, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
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
