"""Where run checkpoints live: one ``Store`` over any fsspec filesystem; a local path is fsspec's ``LocalFileSystem``.

The store offers what the run manager, the catalog, the CLI and the export need (list, read, write, publish a
staged folder with its completeness marker last, remove, materialise locally, lock), so none of them asks "is
this local or remote?". The one difference that cannot be hidden, how a folder becomes visible at once, is
handled here:

* local: the folder is staged as a hidden sibling (``.<name>.incomplete``, same filesystem), every file in it is
  fsynced, then the marker is written and fsynced, then the folder is renamed into place (atomic) and its parent
  fsynced. A crash leaves either no folder or a complete one.
* object stores (``s3://``, ``gs://``, ``memory://``...) have no atomic rename: the folder is staged in a
  node-local temporary folder, uploaded file by file, and the marker goes up last. A folder without its marker is
  not complete; readers ignore it and the next manager removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from agilerl_llm.checkpoint.files import fsync_dir, fsync_file, fsync_tree, rename_into_place, write_text_durably

_LOCAL_PROTOCOLS = {None, "file", "local"}
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
LOCK_FILE = ".agilerl_llm.lock"


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


def basename(location: str | os.PathLike) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def local_work_dir(url: str) -> Path:
    """A local folder for staging and downloads of one remote location; the same in every process on a node, so
    collective writers (DeepSpeed) and several ranks see one staging folder, as they do with a local path."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"agilerl_llm_checkpoint_{digest}"


class CheckpointLockedError(RuntimeError):
    """Another live run writes checkpoints to the same location."""


class Store:
    """A folder on an fsspec filesystem; every ``name`` below is relative to it ("" is the folder itself).

    ``location()`` gives what users see: a ``Path`` for a local folder, a URL string otherwise. Listings are
    refreshed before each read of metadata: another process may have changed the store since fsspec cached one.
    """

    def __init__(self, location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        location = normalize_location(location if isinstance(location, Path) else os.fspath(location), "path")
        self._local = isinstance(location, Path)
        self.storage_options = dict(storage_options or {})
        if self._local:
            self.fs: fsspec.AbstractFileSystem = LocalFileSystem()
            self.root = str(Path(location).absolute())
            self._shown: Path | str = Path(location)
        else:
            self.fs, root = url_to_fs(location, **self.storage_options)
            self.root = root.rstrip("/")
            self._shown = location.rstrip("/")

    def sub(self, name: str) -> Store:
        """The store of the folder ``name`` below this one, on the same filesystem."""
        store = object.__new__(Store)
        store._local, store.fs, store.storage_options = self._local, self.fs, self.storage_options
        store.root, store._shown = self.full(name), self.location(name)
        return store

    # ------------------------------------------------------------------------------------------- names
    def full(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def location(self, name: str = "") -> Path | str:
        """``name`` as the user sees it: a local ``Path`` or a URL."""
        if not name:
            return self._shown
        return self._shown / name if isinstance(self._shown, Path) else f"{self._shown}/{name}"

    def _refresh(self) -> None:
        self.fs.invalidate_cache()

    # ------------------------------------------------------------------------------------------- reading
    def exists(self, name: str = "") -> bool:
        self._refresh()
        return self.fs.exists(self.full(name))

    def isfile(self, name: str) -> bool:
        self._refresh()
        return self.fs.isfile(self.full(name))

    def isdir(self, name: str = "") -> bool:
        self._refresh()
        return self.fs.isdir(self.full(name))

    def listdir(self, name: str = "") -> list[str]:
        """Names directly under ``name`` (empty when it does not exist)."""
        self._refresh()
        try:
            entries = self.fs.ls(self.full(name), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        prefix = self.full(name).rstrip("/") + "/"
        names = {entry.rstrip("/")[len(prefix) :] for entry in entries if entry.rstrip("/").startswith(prefix)}
        return sorted(n for n in names if n and "/" not in n)

    def files(self, name: str = "") -> dict[str, int]:
        """Every file below ``name`` as {path relative to ``name``: size in bytes}."""
        self._refresh()
        base = self.full(name).rstrip("/") + "/"
        try:
            found = self.fs.find(self.full(name), detail=True)
        except FileNotFoundError:
            return {}
        return {
            path[len(base) :]: int(info.get("size") or 0)
            for path, info in found.items()
            if path.startswith(base) and info.get("type") != "directory"
        }

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it is missing or unreadable as text."""
        try:
            return self.fs.cat_file(self.full(name)).decode()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError):
            return None

    # ------------------------------------------------------------------------------------------- writing
    def write_text(self, name: str, text: str) -> None:
        """Replace the file ``name`` atomically: readers see the old or the new content, never a part (local: a
        temporary file, fsynced, then renamed; remote: one object in one request)."""
        if not self._local:
            self.fs.pipe_file(self.full(name), text.encode())
            return
        target = Path(self.full(name))
        temp = target.with_name(f".{target.name}.tmp")
        write_text_durably(temp, text)
        os.replace(temp, target)
        fsync_dir(target.parent)

    def makedirs(self, name: str = "") -> None:
        if self._local:
            Path(self.full(name)).mkdir(parents=True, exist_ok=True)

    def rm(self, name: str) -> None:
        """Delete a file or a whole folder; missing is fine."""
        self._refresh()
        path = self.full(name)
        if self._local:
            local = Path(path)
            if local.is_dir() and not local.is_symlink():
                shutil.rmtree(local)
            elif local.exists() or local.is_symlink():
                local.unlink()
            return
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self._refresh()

    def staging_dir(self, name: str) -> Path:
        """A local folder in which to build the folder ``name`` before ``publish``: a hidden sibling on the same
        filesystem for a local store (so the rename is atomic), a node-local temporary folder otherwise (the
        same in every process of a node)."""
        if self._local:
            target = Path(self.full(name))
            return target.with_name(f".{target.name}.incomplete")
        return local_work_dir(self.location()) / f".{name.replace('/', '__')}.incomplete"

    def publish(self, staging: Path, name: str, marker: str, marker_text: str | None = None) -> None:
        """Make the staged folder ``staging`` visible as ``name``, complete, with the file ``marker`` last.

        ``marker_text``: written as ``marker`` by the store (after everything else is durable); None when
        ``staging`` already holds the marker file. A folder already at ``name`` (a re-run over an abandoned
        future of the run) is replaced: locally it is moved aside and deleted only after the rename; remotely it
        first loses its marker (so it reads as incomplete), is deleted, and the new files go up.
        """
        if self._local:
            self._publish_local(staging, Path(self.full(name)), marker, marker_text)
        else:
            self._publish_remote(staging, name, marker, marker_text)

    def _publish_local(self, staging: Path, final: Path, marker: str, marker_text: str | None) -> None:
        fsync_tree(staging)  # every file durable before the marker says the folder is complete
        if marker_text is not None:
            write_text_durably(staging / marker, marker_text)
        else:
            fsync_file(staging / marker)
        fsync_dir(staging)
        rename_into_place(staging, final)

    def _publish_remote(self, staging: Path, name: str, marker: str, marker_text: str | None) -> None:
        if self.exists(name):
            self.rm(f"{name}/{marker}")
            self.rm(name)  # stale files the new save would not overwrite (e.g. fewer ranks) go too
        local_files = sorted(p for p in staging.rglob("*") if p.is_file())
        first = [p for p in local_files if p.relative_to(staging).as_posix() != marker]
        if first:
            self.fs.put(
                [str(p) for p in first], [self.full(f"{name}/{p.relative_to(staging).as_posix()}") for p in first]
            )
        if marker_text is not None:
            self.fs.pipe_file(self.full(f"{name}/{marker}"), marker_text.encode())
        elif (staging / marker).is_file():
            self.fs.put_file(str(staging / marker), self.full(f"{name}/{marker}"))
        self._refresh()
        shutil.rmtree(staging, ignore_errors=True)
        with suppress(OSError):  # the node-local work folder too, once empty
            staging.parent.rmdir()

    def remove_incomplete(self, pattern: re.Pattern, marker: str, temporaries: re.Pattern) -> list[Path | str]:
        """Delete what a crash left: entries whose name matches ``temporaries`` (hidden staging folders, temp
        files), folders matching ``pattern`` without ``marker`` on object stores (an interrupted upload), and the
        node-local staging folder of a remote store. Returns what was removed."""
        removed: list[Path | str] = []
        if not self._local:
            shutil.rmtree(local_work_dir(self.location()), ignore_errors=True)
        for name in self.listdir():
            stale = temporaries.match(name) or (
                not self._local and pattern.match(name) and not self.isfile(f"{name}/{marker}")
            )
            if stale:
                self.rm(name)
                removed.append(self.location(name))
        return removed

    # ------------------------------------------------------------------------------------------- local copies
    @contextmanager
    def materialize(
        self, name: str = "", is_main: bool = True, wait: Callable[[], None] = lambda: None
    ) -> Iterator[Path]:
        """A local folder with the content of ``name``: the folder itself on a local store; otherwise a download
        into a node-local temporary folder by the main process, read by every process and removed after all of
        them are done (``wait`` is the barrier)."""
        if self._local:
            yield Path(self.full(name))
            return
        work = local_work_dir(str(self.location(name)))
        local = work / (basename(name) if name else basename(self.root))
        if is_main:
            self._download(name, local)
        wait()
        try:
            yield local
        finally:
            wait()
            if is_main:
                shutil.rmtree(work, ignore_errors=True)

    @contextmanager
    def materialize_some(self, names: list[str]) -> Iterator[Path]:
        """A local folder holding the files and folders ``names`` (missing ones skipped): this folder itself on a
        local store, a temporary download (removed on exit) otherwise."""
        if self._local:
            yield Path(self.full())
            return
        with tempfile.TemporaryDirectory(prefix="agilerl_llm_ckpt_") as temp:
            local = Path(temp) / basename(self.root)
            local.mkdir()
            for name in names:
                if self.isfile(name):
                    (local / name).parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self.full(name), str(local / name))
                elif self.exists(name):
                    self._download(name, local / name)
            yield local

    def _download(self, name: str, local: Path) -> None:
        remote = self.files(name)
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        sources, targets = [], []
        for relative in remote:
            target = local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            sources.append(self.full(f"{name}/{relative}" if name else relative))
            targets.append(str(target))
        if sources:
            self.fs.get(sources, targets)

    def shows(self, local: Path, problems: list[str]) -> list[str]:
        """Messages about a materialised copy ``local`` rewritten to name this store's location."""
        if self._local:
            return problems
        return [problem.replace(str(local), str(self.location())) for problem in problems]

    # ------------------------------------------------------------------------------------------- the writer lock
    def acquire_lock(self, run_id: str) -> dict[str, Any]:
        """Make this process the one writer of this location, or raise ``CheckpointLockedError`` naming the
        run that is (see ``_lock_owner_is_gone`` for when an existing lock is taken over). Returns the lock."""
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
            "process_start": _process_start(os.getpid()),
            "run_id": run_id,
        }
        held = self._read_lock()
        if held is not None and not self._lock_owner_is_gone(held):
            raise CheckpointLockedError(
                f"checkpoint path {self.location()} is in use by another run (pid {held.get('pid')} on host "
                f"{held.get('host')}, started {held.get('started')}, run id {held.get('run_id')}). Two runs writing "
                "one checkpoint path delete each other's saves. Wait for that run to finish, give this run another "
                f"checkpoint path, or, if that run is dead on another machine, delete {self.location(LOCK_FILE)}."
            )
        text = json.dumps(mine)
        if self._local:
            self._create_local_lock(text, replace=held is not None)
        else:
            self.write_text(LOCK_FILE, text)
            time.sleep(0.05)  # no compare-and-swap on object stores: write, then check that ours survived
        if self._read_lock() != mine:
            held = self._read_lock() or {}
            raise CheckpointLockedError(
                f"checkpoint path {self.location()}: another run (pid {held.get('pid')} on host {held.get('host')}) "
                "took the writer lock at the same moment; give each run its own checkpoint path."
            )
        return mine

    def release_lock(self, run_id: str) -> None:
        """Remove the lock if this run still holds it. Never raises: it also runs at interpreter exit, when the
        store may be gone; a lock left behind is taken over as stale by the next run on this host."""
        try:
            held = self._read_lock()
            if held is not None and held.get("run_id") == run_id:
                self.rm(LOCK_FILE)
        except Exception:
            pass

    def _read_lock(self) -> dict[str, Any] | None:
        text = self.read_text(LOCK_FILE)
        if text is None:
            return None
        try:
            held = json.loads(text)
        except json.JSONDecodeError:
            return {"pid": None, "host": None, "started": None, "run_id": "unreadable lock file"}
        return held if isinstance(held, dict) else None

    def _lock_owner_is_gone(self, held: dict[str, Any]) -> bool:
        """A lock can be taken over when its process is this one (an earlier manager of the same process) or,
        on the same host, when that process is no longer running (the pid is dead, or reused by a process that
        started at another time): a stale lock, taken over with a warning. A lock from another host is never
        taken over automatically."""
        if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
            return False
        pid = held["pid"]
        if pid == os.getpid():
            return True
        alive = _pid_alive(pid) and (
            held.get("process_start") is None or _process_start(pid) == held.get("process_start")
        )
        if alive:
            return False
        warnings.warn(
            f"checkpoint path {self.location()}: taking over the lock of run {held.get('run_id')} (pid {pid}, "
            f"started {held.get('started')}), which is no longer running.",
            UserWarning,
            stacklevel=4,
        )
        return True

    def _create_local_lock(self, text: str, replace: bool) -> None:
        path = Path(self.full(LOCK_FILE))
        if replace:
            self.write_text(LOCK_FILE, text)
            return
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return  # created between our read and now: the check after this reports who holds it
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
