"""``create_population``: a population of agents over ONE copy of the frozen base model.

Member 0 is built normally (the base model is loaded once); members 1..size-1 are ``clone(index=i)`` of it.
A clone deep-copies the PEFT module tree but keeps pointing at the same frozen base tensors, so every member
owns its LoRA adapters (actor, reference, critic), optimizer state and LR schedule while the base weights
are stored once. All members start identical; mutation and selection make them differ.
"""

from __future__ import annotations

from typing import Any


def create_population(algo_cls: type, size: int, **kwargs: Any) -> list[Any]:
    """``size`` agents of ``algo_cls`` (indices 0..size-1) sharing one frozen base model.

    Args:
        algo_cls: an ``LLMAlgorithm`` subclass (GRPO, LLMPPO, DPO, ...).
        size: number of members, >= 1.
        **kwargs: the constructor arguments of ``algo_cls`` (``hp_config`` included); ``index`` is set here.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    if "index" in kwargs:
        raise ValueError("create_population numbers the members itself (0..size-1); do not pass index.")
    first = algo_cls(index=0, **kwargs)
    return [first, *(first.clone(index=index) for index in range(1, size))]
