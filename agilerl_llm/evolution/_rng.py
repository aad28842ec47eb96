"""Seeded numpy generators whose state is plain, JSON-able data (for run checkpoints)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np


def make_rng(seed: int | None) -> np.random.Generator:
    """A PCG64 generator; ``seed=None`` draws fresh entropy."""
    return np.random.Generator(np.random.PCG64(seed))


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's state as nested dicts of str and int (``json.dumps`` round-trips it exactly)."""
    return copy.deepcopy(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Restore a state made by ``rng_state``."""
    if state.get("bit_generator") != type(rng.bit_generator).__name__:
        raise ValueError(
            f"RNG state is for {state.get('bit_generator')!r}, but this generator is "
            f"{type(rng.bit_generator).__name__!r}."
        )
    rng.bit_generator.state = copy.deepcopy(state)
