"""Running a decoder once on a tiny input to check that a forward variant (packing, a shared prefix) gives it the
hidden states of the plain forward: the shared mechanics of those checks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def probe_device(backbone: nn.Module) -> torch.device | None:
    """Where the probe's tensors go; None when the decoder cannot run before the agent exists (ZeRO-3 partitioned
    the weights as they loaded), and only a check's static conditions apply."""
    weight = backbone.get_input_embeddings().weight
    return None if hasattr(weight, "ds_id") else weight.device


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the block (no dropout, so the runs compare), then the mode the module had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def relative_difference(got: torch.Tensor, expected: torch.Tensor, backbone: nn.Module) -> float | None:
    """The largest difference relative to the largest value when it is beyond rounding for the decoder's dtype
    (1e-3 in float32, 5e-2 in half precision), else None."""
    got, expected = got.float(), expected.float()
    error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-6))
    tolerance = 1e-3 if backbone.get_input_embeddings().weight.dtype == torch.float32 else 5e-2
    return error if error > tolerance else None
