"""Fast host copies of an agent's checkpoint state, for saving in a background thread (``save_async``).

``agent.checkpoint_state(to_host=True)`` (the contract in ``state.py``) uses these copies: exactly what
``save_checkpoint`` writes, copied to host memory so training can go on while ``write_snapshot`` writes it with the
same files, bytes and atomic staging as a synchronous save.

The copy is the part of a save the training loop waits for, so it is kept short: the previous snapshot's host
tensors are reused as destinations when they fit (one batched copy instead of fresh allocations), and the walk over
the model's parameters is cached per module tree and revalidated cheaply before each use. A run checkpoint goes one
step further (``DeferredCopy``): the loop only queues the copies into reused buffers, and the writer thread does them
while training goes on, fenced so that nothing writes to a tensor before it is copied.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agilerl_llm.checkpoint import files
from agilerl_llm.distributed import is_partitioned
from agilerl_llm.utils import write_fence

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm
    from agilerl_llm.checkpoint.state import AgentState


def write_snapshot(snapshot: AgentState, path: str | os.PathLike) -> None:
    """Write a snapshot to the folder ``path`` exactly as ``save_checkpoint`` would (same files, same atomic
    staging + rename). Pure file I/O in the calling process: no collective calls, safe in a background thread."""
    from agilerl_llm.checkpoint.state import write_state

    path = Path(path)
    staging = path.with_name(f".{path.name}.incomplete")
    files.check_target(path)
    files.remove_folder(staging)
    try:
        write_state(snapshot, staging)
        files.publish(staging, path)
    except BaseException:
        files.remove_folder(staging)
        raise


# actor module -> (its LoRA parameter names, [(adapter, PEFT key, parameter name)] in PEFT's order)
_ADAPTER_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_weights_fast(
    agent: LLMAlgorithm,
    named: dict[str, torch.nn.Parameter],
    reuse: dict[str, dict[str, torch.Tensor]] | None = None,
    copier: HostCopier | None = None,
) -> dict[str, dict[str, torch.Tensor]] | None:
    """``state._adapter_weights`` as host copies, without PEFT's state-dict walk (tens of ms per adapter): PEFT's key for each LoRA
    parameter is worked out once per model and reused while the model's LoRA parameter names are unchanged.
    None when that does not apply (ZeRO-3 partitioned parameters, or PEFT keys that are not plain parameters).
    ``reuse``: earlier host copies (same layout) to overwrite instead of allocating (see ``state.capture_state``);
    with ``copier`` those copies are only queued (its ``flush()`` does them)."""
    cached = _ADAPTER_KEYS.get(agent.actor)
    if cached is None or cached[0] is not named:
        lora = {n: p for n, p in named.items() if "lora_" in n or ".modules_to_save." in n}
        if cached is None or cached[1] != frozenset(lora):
            order = _adapter_order(agent, lora)
            if order is None:
                return None
        else:
            order = cached[2]
        cached = (named, frozenset(lora), order, [p for _, _, n in order for p in (lora[n],)])
        _ADAPTER_KEYS[agent.actor] = cached
    if any(is_partitioned(p) for p in cached[3]):
        return None
    reuse = reuse or {}
    own = copier is None
    copier = HostCopier() if own else copier
    weights: dict[str, dict[str, torch.Tensor]] = {adapter: {} for adapter in agent.adapter_names()}
    for (adapter, key, _), parameter in zip(cached[2], cached[3], strict=True):
        weights[adapter][key] = copier.tensor(parameter, reuse.get(adapter, {}).get(key), contiguous=True)
    if own:
        copier.flush()
    return weights


def _adapter_order(agent: LLMAlgorithm, lora: dict[str, torch.nn.Parameter]) -> list[tuple[str, str, str]] | None:
    """[(adapter, PEFT key, parameter name)] in PEFT's state-dict order; None when a key is not a plain parameter."""
    if any(is_partitioned(p) for p in lora.values()):
        return None
    by_storage = {(p.data_ptr(), tuple(p.shape), p.stride()): n for n, p in lora.items()}
    order = []
    for adapter in agent.adapter_names():
        for key, tensor in agent.adapters.state_dict(adapter).items():
            name = by_storage.get((tensor.data_ptr(), tuple(tensor.shape), tensor.stride()))
            if name is None:
                return None
            order.append((adapter, key, name))
    return order


def _fits(old: Any, value: torch.Tensor) -> bool:
    """Whether the earlier host copy ``old`` can be overwritten with ``value`` and end up exactly as a fresh
    ``value.detach().to("cpu", copy=True)`` would be (same shape, dtype and strides; a separate, compact CPU tensor)."""
    return (
        isinstance(old, torch.Tensor)
        and old.is_cpu
        and old.dtype == value.dtype
        and old.shape == value.shape
        and old.stride() == value.stride()
        and old.storage_offset() == 0
        and old.untyped_storage().nbytes() == old.numel() * old.element_size()  # written whole by torch.save
        and not old.requires_grad
        and old is not value
    )


class HostCopier:
    """Copies tensors to host memory, into earlier copies where they fit (``_fits``), else into fresh tensors.

    Copies into earlier tensors are queued and done by ``flush()`` in one ``torch._foreach_copy_`` call (hundreds
    of small optimizer and LoRA tensors: per-call overhead, not bandwidth, dominates a copy_ loop)."""

    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []
        self.sources: list[torch.Tensor] = []
        self.taken: set[int] = set()  # ids of the targets: an earlier tensor is reused for one place only

    def tensor(self, value: torch.Tensor, old: Any = None, contiguous: bool = False) -> torch.Tensor:
        if (
            old is not None
            and _fits(old, value)
            and (not contiguous or old.is_contiguous())
            and id(old) not in self.taken
        ):
            self.taken.add(id(old))
            self.targets.append(old)
            self.sources.append(value)  # flush() copies under no_grad
            return old  # filled by flush()
        fresh = value.detach().to("cpu", copy=True)
        return fresh.contiguous() if contiguous else fresh

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The queued (targets, sources), handed over; the copier starts empty again."""
        targets, sources, self.targets, self.sources, self.taken = self.targets, self.sources, [], [], set()
        return targets, sources

    def flush(self) -> None:
        _copy(*self.take())


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if not targets:
        return
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(targets, sources)
        else:
            for target, source in zip(targets, sources, strict=True):
                target.copy_(source)


class TornSnapshotError(RuntimeError):
    """A tensor of a deferred snapshot was changed in place before the writer thread had copied it."""


class DeferredCopy:
    """The host copies a ``HostCopier`` queued, done later by ``run()`` on the checkpoint writer thread.

    Until ``run()`` is over, whatever writes to one of the copied tensors must call ``write_fence.fence()`` first,
    or the snapshot would mix values from before and after the write. Every optimizer step does (a global step
    pre-hook, registered with the first deferred copy), and so do agilerl_llm's own writes to live weights (adapter
    loads and copies, ``load_checkpoint_state``). A write that skips the fence is caught: ``run()`` compares every
    source's version counter with the one it had when queued and raises ``TornSnapshotError`` instead of handing
    over mixed data (in-place writes through ``.data`` do not move the counter; none of agilerl_llm's own writes go
    that way).
    """

    def __init__(self, copier: HostCopier) -> None:
        self._targets, self._sources = copier.take()
        self._versions = [source._version for source in self._sources]
        self.done = threading.Event()
        if not self._targets:
            self.done.set()
            return
        write_fence.watch(self.done)

    def run(self) -> None:
        try:
            _copy(self._targets, self._sources)
            changed = sum(s._version != v for s, v in zip(self._sources, self._versions, strict=True))
        finally:
            self._targets, self._sources, self._versions = [], [], []  # hold no live tensors once done
            self.done.set()
        if changed:
            raise TornSnapshotError(
                f"{changed} tensor(s) of the checkpoint snapshot were changed in place before the background copy "
                "was done, so this checkpoint is not written. Call CheckpointManager.wait() before changing model "
                "or optimizer tensors outside an optimizer step, or set CheckpointConfig.save_async=False."
            )


_IMMUTABLE = (int, float, bool, str, bytes, type(None))


def host_copy(value: Any, reuse: Any = None, copier: HostCopier | None = None) -> Any:
    """A copy of plain data with every tensor copied to CPU (nothing shared with the live training state).

    ``reuse``: an earlier result for data of the same structure; its tensors are overwritten where they fit
    (``_fits``) instead of allocating fresh ones. With ``copier`` those copies are only queued: call its
    ``flush()`` before the result is read."""
    if copier is None:
        copier = HostCopier()
        result = host_copy(value, reuse, copier)
        copier.flush()
        return result
    if isinstance(value, torch.Tensor):
        return copier.tensor(value, reuse)
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind in (dict, OrderedDict):  # leaves handled inline: optimizer state is hundreds of small dicts
        old = reuse if type(reuse) is kind else {}
        result = kind()
        for k, v in value.items():
            if type(v) in _IMMUTABLE:
                result[k] = v
            elif isinstance(v, torch.Tensor):
                result[k] = copier.tensor(v, old.get(k))
            else:
                result[k] = host_copy(v, old.get(k), copier)
        return result
    if kind in (list, tuple):
        if type(reuse) is not kind or len(reuse) != len(value):
            reuse = (None,) * len(value)
        return kind(host_copy(v, r, copier) for v, r in zip(value, reuse, strict=True))
    return copy.deepcopy(value)
