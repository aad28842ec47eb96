"""liger-kernel's Triton kernels: SFT's and DPO's fused linear cross-entropy, and the model patches.

**Fused linear cross-entropy** (SFT and DPO with ``use_liger_loss=True``).

Liger's kernel takes the final hidden states and the lm_head weight and returns each target token's
cross-entropy (``reduction="none"``: the negative log-prob), tile by tile, so the logits never exist at once; its
backward folds the per-token upstream gradient in before projecting. SFT's NLL and DPO's summed sequence
log-probs are then computed from these log-probs exactly as on the standard path (``losses.sft_loss``,
``losses.sequence_logprobs``): only the op that turns hidden states into log-probs changes.

**Model patches** (``apply_liger_model_patches``): Liger's fused RMSNorm and SwiGLU MLP replace the model's own
wherever liger-kernel is installed and the training device is a GPU with Triton; every algorithm's base model gets
them at construction, before the adapters are injected (LoRA layers inside the MLP still run). They are confined
to that model instance: Liger's patch functions also rebind the modeling module's classes, which we restore, and
its RoPE kernel can only be installed module-wide (every model of the type in the process), so it is left out.

Both are Triton. The cross-entropy runs where Triton does: a CUDA / ROCm / XPU device, or any device under
``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for correctness checks at tiny sizes, as the tests use); on a
plain CPU ``use_liger_loss=True`` for SFT / DPO is refused with the reason. The patches need a GPU: Liger's RMSNorm
and SwiGLU kernels fail in Triton's interpreter, so they are never applied on a CPU, interpreter or not.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any

import torch
from torch import Tensor

from agilerl_llm.model.liger import LIGER_EXTRA

IGNORE_INDEX = -100
# What the model patches replace, on the agent's model instance only. Left out: Liger's RoPE (it swaps the modeling
# module's rotary function, i.e. for every model of that type in the process, CPU ones included) and its
# cross-entropy forwards of the *ForCausalLM (the training forward stops at the hidden states).
PATCHED_KERNELS = {"rope": False, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                   "fused_linear_cross_entropy": False}  # fmt: skip

logger = logging.getLogger(__name__)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Liger's Triton kernels cannot run on ``device`` here (None: they can)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if device.type not in ("cuda", "xpu"):
        return (
            f"its fused linear cross-entropy is a Triton kernel and Triton does not run on a {device.type!r} device "
            "(TRITON_INTERPRET=1 runs it slowly, for correctness checks only)"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return "its fused linear cross-entropy is a Triton kernel and triton is not installed"
    return None


def require_liger_cross_entropy(device: torch.device, algorithm: str) -> Any:
    """liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` class, once it is known to run on ``device``.

    Raises:
        ImportError: naming the ``liger`` extra when liger-kernel is not installed.
        ValueError: naming ``use_liger_loss`` when Triton cannot run on ``device``.
    """
    if reason := triton_unavailable_reason(device):
        raise ValueError(
            f"use_liger_loss=True for {algorithm}: {reason}. Set use_liger_loss=False on this device: the standard "
            "fused log-prob op also never builds the full logits."
        )
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        raise ImportError(LIGER_EXTRA) from error
    return LigerFusedLinearCrossEntropyLoss


def liger_token_logprobs(hidden: Tensor, weight: Tensor, target_ids: Tensor, bias: Tensor | None = None) -> Tensor:
    """Log-probs of the target tokens through Liger's fused linear cross-entropy.

    Args:
        hidden: (B, T, H) final hidden states (position t predicts ``target_ids[:, t]``).
        weight: (V, H) lm_head weight; bias: (V,) or None.
        target_ids: (B, T) token ids.

    Returns:
        (B, T) log-probs, float32, differentiable with respect to ``hidden`` (and ``weight`` if it requires grad).
    """
    loss_cls = require_liger_cross_entropy(hidden.device, "this agent")
    batch, steps, size = hidden.shape
    token_losses = loss_cls(reduction="none", ignore_index=IGNORE_INDEX, accum_dtype=torch.float32)(
        weight, hidden.reshape(batch * steps, size), target_ids.reshape(-1), bias
    )
    return -token_losses.float().reshape(batch, steps)


def apply_liger_model_patches(model: Any, device: torch.device) -> bool:
    """Patch ``model`` with Liger's RMSNorm / RoPE / SwiGLU kernels when liger-kernel is installed, ``device`` is a
    GPU with Triton and Liger supports the model's type; returns whether it did (never on a CPU)."""
    # GPUs only, not Triton's interpreter: Liger's RMSNorm and SwiGLU kernels do not run in it (triton 3.9,
    # liger-kernel 0.8.5), unlike its cross-entropy.
    if device.type not in ("cuda", "xpu") or triton_unavailable_reason(device) is not None:
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        logger.info("Liger has no model patches for model type %r; the model runs unpatched.", model_type)
        return False
    accepted = inspect.signature(apply).parameters  # e.g. Gemma's patch takes geglu, not swiglu
    saved = _modeling_module_globals()
    apply(model=model, **{name: value for name, value in PATCHED_KERNELS.items() if name in accepted})
    # Liger also rebinds the modeling module's classes (so later models of the type would be built patched, even
    # on a CPU): put them back; this instance keeps its patched forwards.
    for module_name, namespace in saved.items():
        module = sys.modules[module_name]
        for key, value in namespace.items():
            if vars(module).get(key) is not value:
                setattr(module, key, value)
    logger.info("Liger's fused RMSNorm and SwiGLU kernels patched into this %s model.", model_type)
    return True


def _modeling_module_globals() -> dict[str, dict[str, Any]]:
    return {
        name: dict(vars(module))
        for name, module in list(sys.modules.items())
        if name.startswith("transformers.models.") and module is not None
    }
