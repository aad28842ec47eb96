"""The value head of PPO's critic: a linear map from the final hidden state to a scalar value per position.

The critic is the frozen base model with the ``critic`` LoRA adapter active, followed by this head. Its
weights travel in checkpoints as ``modules/value_head.safetensors`` (``LLMPPO.checkpoint_modules``).

Notation: N rows, S tokens, H hidden size.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """``V(h) = w . h + b`` per position: (N, S, H) hidden states -> (N, S) values, computed in fp32.

    Args:
        hidden_size: H.
        init_std: std of the initial weights; the bias starts at 0, so initial values are near 0.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.01) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}.")
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states.to(self.linear.weight.dtype)).squeeze(-1)
