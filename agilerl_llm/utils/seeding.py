"""One call that seeds every random number generator a run draws from."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and, where present, every CUDA device) with ``seed``.

    numpy takes seeds below 2**32 only, so it gets ``seed % 2**32``; python and torch take the seed as given.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
