"""The value head of PPO's critic: a linear map from the final hidden state to a scalar value per position.

The critic is the frozen base model with the ``critic`` LoRA adapter active, followed by this head. Its
weights travel in checkpoints as plain nested lists (``plain_state`` / ``load_plain_state``), the form that
``attributes.pt`` accepts under ``torch.load(weights_only=True)``.

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

    def plain_state(self) -> dict[str, list]:
        """The weights as nested Python lists (plain data for ``attributes.pt``)."""
        return {name: tensor.detach().cpu().tolist() for name, tensor in self.linear.state_dict().items()}

    @torch.no_grad()
    def load_plain_state(self, state: dict[str, list]) -> None:
        """Load weights saved by ``plain_state``; shapes must match."""
        for name, tensor in self.linear.state_dict().items():
            value = torch.tensor(state[name], dtype=tensor.dtype)
            if value.shape != tensor.shape:
                raise ValueError(
                    f"value head {name!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(tensor.shape)} "
                    "here: the checkpoint was made for another base model."
                )
            tensor.copy_(value)
