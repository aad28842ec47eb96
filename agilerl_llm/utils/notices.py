"""One-time notices for settings that cannot take effect here, so none is ignored silently or repeated each step."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str, *, stacklevel: int = 3) -> None:
    """Emit ``message`` as a UserWarning the first time ``key`` is seen in this process; later calls are silent.

    ``stacklevel`` 3 points at the caller of the function that calls this (the user's code, usually).
    """
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
