"""PEFT's LoRA linear layer with a leaner forward for the plain case: the adapter's up-projection and its scaling
added onto the base output in one ``addmm``.

PEFT computes ``result + lora_B(lora_A(dropout(x))) * scaling``: a (N, out) matmul output, then a (N, out) multiply
and a (N, out) add, each a fresh tensor, and the multiply again in the backward. ``addmm(result, h, B^T,
alpha=scaling)`` writes the sum once, and its backward applies ``scaling`` on the rank-r side. On the tiny models
of the benchmarks those elementwise passes over the layer outputs were about a tenth of a training step.

The result equals PEFT's up to float rounding (the scaled product is added inside the matmul;
``tests/test_lean_lora.py``). Anything other than the plain case runs PEFT's own forward: extra forward arguments
(mixed-adapter batches), adapters disabled or merged, LoRA variants (DoRA, ...), a LoRA bias, and ZeRO-3 partitioned
adapter weights (which only the adapter modules' own forward hooks gather). Dtypes follow PEFT: the input is cast to
the adapter's dtype (fp32 adapters on a bf16 base), the sum is taken in the promoted dtype and cast back to the base
output's.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from agilerl_llm.distributed import is_partitioned


class LeanLoraLinear(LoraLinear):
    """A ``peft.tuners.lora.layer.Linear`` (same state, same PEFT behaviour) whose forward fuses the adapter's
    up-projection, scaling and residual add; layers get this class by ``use_lean_lora_layers``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        for name in adapters:
            down, up = self.lora_A[name], self.lora_B[name]
            if (
                name in getattr(self, "lora_variant", {})  # DoRA and other variants (older PEFT: use_dora)
                or getattr(self, "use_dora", {}).get(name, False)
                or up.bias is not None
                or is_partitioned(down.weight)
                or is_partitioned(up.weight)
            ):
                return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        result_dtype = result.dtype
        for name in adapters:
            x = self._cast_input_dtype(
                x, self.lora_A[name].weight.dtype
            )  # as PEFT does (e.g. fp32 adapters, bf16 base)
            hidden = self.lora_A[name](self.lora_dropout[name](x))
            up_weight = self.lora_B[name].weight
            dtype = torch.promote_types(torch.promote_types(result.dtype, hidden.dtype), up_weight.dtype)  # PEFT's sum
            shape = result.shape
            result = torch.addmm(
                result.reshape(-1, shape[-1]).to(dtype),
                hidden.reshape(-1, hidden.shape[-1]).to(dtype),
                up_weight.t().to(dtype),
                alpha=self.scaling[name],
            ).view(shape)
        return result.to(result_dtype)


def use_lean_lora_layers(model: torch.nn.Module) -> int:
    """Give every plain PEFT LoRA linear layer of ``model`` the lean forward (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = LeanLoraLinear
            count += 1
    return count
