"""The training forward: a causal LM run up to its final hidden states, never to full logits.

Log-probs are computed from those hidden states and the lm_head weight by the fused chunked op in
``model/logprobs.py``, so the (tokens x vocab) logits tensor is never materialised. This module is what
an ``Accelerator`` wraps (DDP / DeepSpeed): every trainable parameter is used inside its ``forward``.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from agilerl_llm.model.packing import packed_forward
from agilerl_llm.model.prefix_sharing import shared_prefix_forward


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them.

    (B, S) mask -> (B, S) int64 positions; padded slots get position 0 (they are masked anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attended_columns(attention_mask: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` of the columns some row attends to: (B, S) mask -> the window outside which every row is
    padding (the batch's shared left and right padding), the whole width when no row attends at all."""
    columns = attention_mask.any(dim=0).nonzero()
    return (int(columns[0]), int(columns[-1]) + 1) if len(columns) else (0, attention_mask.shape[1])


def decoder_of(peft_model: PeftModel) -> nn.Module:
    """The decoder stack below the lm_head of a PEFT causal LM (LoRA layers injected in place)."""
    causal_lm = peft_model.get_base_model()
    return getattr(causal_lm, causal_lm.base_model_prefix)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so frozen inputs are fine)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HiddenStatesModel(nn.Module):
    """Wraps a PEFT causal LM; ``forward`` returns the final (normed) hidden states (B, S, H).

    Args:
        peft_model: the adapter-carrying causal LM.
        calc_position_embeddings: pass explicit position ids derived from the attention mask (needed for
            left-padded batches to match what ``generate`` computed).
        value_head: PPO's value head, kept inside this module so the accelerator wraps (and DeepSpeed's engine
            trains) it together with the adapters; ``forward(..., values=True)`` applies it.
        sequence_packing: run the decoder on the batch's real tokens packed end to end (``model/packing.py``);
            the hidden states come back in the padded layout, zero on padding.
        prefix_sharing: when a forward is given ``prefix_length``, run each distinct prefix (a group's prompt)
            once and the rows' remainders on its cache (``model/prefix_sharing.py``); it takes precedence over
            packing where rows share a prefix.
    """

    def __init__(
        self,
        peft_model: PeftModel,
        calc_position_embeddings: bool = True,
        value_head: nn.Module | None = None,
        sequence_packing: bool = False,
        prefix_sharing: bool = False,
    ) -> None:
        super().__init__()
        if sequence_packing and not calc_position_embeddings:
            raise ValueError("sequence packing needs calc_position_embeddings=True (each packed row restarts at 0).")
        self.peft_model = peft_model
        self.calc_position_embeddings = calc_position_embeddings
        self.value_head = value_head
        self.sequence_packing = sequence_packing
        self.prefix_sharing = prefix_sharing and calc_position_embeddings
        # transformers drops a cache inside checkpointed layers when grad is on: no prefix sharing then
        self.checkpointed_layers = any(getattr(m, "gradient_checkpointing", False) for m in self.backbone.modules())
        _check_output_head(self.causal_lm)

    @property
    def causal_lm(self) -> nn.Module:
        """The HuggingFace ``*ForCausalLM`` inside the PEFT wrapper (LoRA layers injected in place)."""
        return self.peft_model.get_base_model()

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack below the lm_head."""
        return decoder_of(self.peft_model)

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The lm_head's weight (V, H) and bias (V,) or None."""
        head = self.causal_lm.get_output_embeddings()
        return head.weight, head.bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        values: bool = False,
        prefix_length: int | None = None,
    ) -> torch.Tensor:
        """(B, S) ids -> (B, S, H) final hidden states, or with ``values`` (B, S-1) values of the value head
        (position t valuing the prefix up to token t). ``prefix_length``: columns that are prompt in every row
        (``shared_prefix_length``), shared by the rows of a group."""
        hidden = None
        if prefix_length and self.prefix_sharing and not (torch.is_grad_enabled() and self.checkpointed_layers):
            positions = position_ids_from_mask(attention_mask)
            hidden = shared_prefix_forward(self.backbone, input_ids, attention_mask, positions, prefix_length)
        if hidden is None and self.sequence_packing:
            hidden = packed_forward(self.backbone, input_ids, attention_mask)
        elif hidden is None:
            position_ids = position_ids_from_mask(attention_mask) if self.calc_position_embeddings else None
            outputs = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            hidden = outputs.last_hidden_state
        if not values:
            return hidden
        if self.value_head is None:
            raise ValueError("values=True needs a value head (only PPO's training forward has one).")
        return self.value_head(hidden[:, :-1])


def _check_output_head(causal_lm: nn.Module) -> None:
    head = causal_lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            f"The model's lm_head is a {type(head).__name__}, not a plain nn.Linear: log-probs are computed from its "
            "weight directly. Remove 'lm_head' from lora_config.target_modules (and keep it unquantised)."
        )
    config = getattr(causal_lm, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attribute, None) not in (None, 1.0):
            raise ValueError(
                f"model config sets {attribute}={getattr(config, attribute)!r}; the fused log-prob op does not "
                "apply logit soft-capping or scaling yet, so its log-probs would be wrong for this model."
            )
