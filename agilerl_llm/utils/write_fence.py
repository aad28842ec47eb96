"""A fence between the training thread's in-place writes and copies of the same tensors still being made elsewhere.

An async run checkpoint (``checkpoint.snapshot.DeferredCopy``) lets the writer thread copy the adapter and optimizer
tensors to host memory while training goes on. Each such copy is ``watch``ed here until it is done; ``fence()``
waits for all of them. Every optimizer step calls it (a global step pre-hook, registered with the first watched
copy), and so do agilerl_llm's own writes to live weights. When nothing is in flight ``fence()`` costs one check.
"""

from __future__ import annotations

import threading
import time

from torch.optim.optimizer import register_optimizer_step_pre_hook

_in_flight: list[threading.Event] = []
_lock = threading.Lock()
_step_hook = None
waited_seconds = 0.0  # time spent in fence() waiting for a copy (the async checkpoint benchmark reports it)


def watch(done: threading.Event) -> None:
    """Make ``fence()`` wait for ``done`` until it is set."""
    global _step_hook
    with _lock:
        _in_flight.append(done)
        if _step_hook is None:  # kept: removing a hook from inside a step would break the step's loop over its hooks
            _step_hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: fence())


def fence() -> None:
    """Wait until every watched copy is done: call before writing in place to tensors a copy may still be reading."""
    global waited_seconds
    if not _in_flight:
        return
    with _lock:
        pending = list(_in_flight)
    started = time.perf_counter()
    for done in pending:
        done.wait()
    waited_seconds += time.perf_counter() - started
    with _lock:
        _in_flight[:] = [done for done in _in_flight if not done.is_set()]
