"""Which samples each process serves: one seeded training order for all ranks, cut into per-rank slices.

Every rank computes the same permutation of the training split per epoch and the same position in it, so the
data position is one global number (identical on every rank, and meaningful at any world size). A step takes
the next ``batch_per_rank x world_size`` samples of that order; rank r serves slice r of them. One process
with a batch of B and N processes with B / N each therefore see the same samples at every step.

The held-out split is dealt out in turn (sample i to rank i mod N) and padded so every rank serves the same
number of samples: ZeRO-3's forward passes are collectives, so all ranks must run the same number. A padded
slot repeats sample 0 and is marked -1, so it is never counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PADDING = -1


class ShardedData:
    """Mixed into the envs: which rank's share of the data they serve (``rank`` of ``world_size``)."""

    rank: int = 0
    world_size: int = 1

    def shard(self, rank: int, world_size: int) -> None:
        """Serve rank ``rank``'s share of the data out of ``world_size`` processes (see the module docstring)."""
        check_shard(rank, world_size)
        self.rank, self.world_size = rank, world_size

    def shard_for(self, accelerator: Any | None) -> None:
        """``shard`` by an accelerator's process index and count (nothing for None)."""
        if accelerator is not None:
            self.shard(int(accelerator.process_index), int(accelerator.num_processes))


def check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}."
        )


def training_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The permutation of the training split served in ``epoch`` (the same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def next_global_batch(seed: int, epoch: int, cursor: int, num_samples: int, size: int) -> tuple[list[int], int, int]:
    """The next ``size`` sample indices of the training order from ``(epoch, cursor)``, rolling over epochs;
    returns (indices, epoch, cursor) after them."""
    indices: list[int] = []
    while len(indices) < size:
        order = training_order(seed, epoch, num_samples)
        take = order[cursor : cursor + size - len(indices)]
        indices.extend(int(i) for i in take)
        cursor += len(take)
        if cursor >= len(order):
            epoch, cursor = epoch + 1, 0
    return indices, epoch, cursor


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch (the batch length is a multiple of ``world_size``)."""
    share = len(indices) // world_size
    return indices[rank * share : (rank + 1) * share]


def held_out_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """The held-out sample indices rank ``rank`` scores, padded with ``PADDING`` to ``ceil(num_samples / world_size)``."""
    own = list(range(rank, num_samples, world_size))
    length = -(-num_samples // world_size)
    return own + [PADDING] * (length - len(own))
