"""Checks of the values an LLM algorithm accepts: the base constructor arguments, and which attribute values are
plain data (hyperparameters that checkpoints carry)."""

from __future__ import annotations

from typing import Any


def is_plain(value: Any) -> bool:
    """True for data that round-trips through JSON-like formats (and torch.load(weights_only=True))."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def check_base_arguments(
    pad_token_id: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float | None,
    micro_batch_size_per_gpu: int | None,
    index: int,
) -> None:
    if not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}.")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}.")
    if micro_batch_size_per_gpu is not None:
        if micro_batch_size_per_gpu < 1 or batch_size % micro_batch_size_per_gpu != 0:
            raise ValueError(
                f"micro_batch_size_per_gpu={micro_batch_size_per_gpu!r} must be >= 1 and divide "
                f"batch_size={batch_size}; gradients accumulate over batch_size // micro_batch_size_per_gpu steps."
            )
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}.")


def refuse_extra_arguments(method: str, args: tuple[Any, ...], kwargs: dict[str, Any], takes: str) -> None:
    """The spec writes ``*args, **kwargs`` on some methods (its subclasses may take more); ours use none, and
    an argument that would be silently dropped is refused instead.

    Raises:
        TypeError: naming the method, the extra arguments and what it does take.
    """
    if args or kwargs:
        extra = [repr(a) for a in args] + [f"{k}=" for k in kwargs]
        raise TypeError(f"{method}() got unexpected arguments {', '.join(extra)}; it takes {takes}.")
