"""Rollouts with HuggingFace ``generate``: batched across prompts, grouped per prompt, masks from lengths.

Prompts arrive left-padded as one (B, P) batch. Each prompt is repeated ``num_completions`` times
(rows of a group are contiguous) and generated in chunks of ``chunk_size`` prompts, so one call to
``generate`` serves many prompts. A completion ends at its first eos token (kept, so the policy learns
to stop) or at the token budget; everything after it is padding, and the masks say so explicitly:
the pad id is never used to find where a completion ends, because pad may equal eos.

Two things keep a rollout from paying for work it does not need:

* the prompt is encoded once per prompt, not once per completion: the KV cache of every prompt token
  but the last is computed for the B distinct prompts and repeated G times, and ``generate`` continues
  from it (``shared_prompt_cache``); without it, prefill does G times the prompt work;
* a PEFT LoRA model is generated through its underlying transformers model (the LoRA layers sit inside
  it, so the active adapter still applies); PEFT's ``generate`` wrapper adds per-step work that plain
  LoRA does not use;
* tokens are drawn by a lean loop (``rollout/sampling.py``: one forward per token, one ``topk`` for top-k /
  top-p / min-p, an exponential race instead of ``multinomial``) rather than ``generate``, whose per-step bookkeeping
  was about a quarter of sampling time at the benchmark's size. ``generate`` still serves what the loop does
  not implement: ZeRO-3's synchronised generation, PEFT methods that need their wrapper, and generation configs
  with extra processing (bad words, forced tokens, n-gram blocking).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from agilerl_llm.model.prefix_sharing import CACHE_ARGUMENT, output_cache
from agilerl_llm.rollout.base import ActionResult, SamplingSettings, masks_from_lengths
from agilerl_llm.rollout.sampling import DecodingSettings, decode, lean_decoding_unsupported_reason

# generate() reads a prefilled cache as ``cache`` in newer transformers, ``past_key_values`` before the rename.
if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm


def completion_lengths(generated: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """Generated tokens to keep per row: up to and including the first eos, else all of them.

    (N, C) generated ids -> (N,) int64 lengths.
    """
    is_eos = torch.isin(generated, torch.tensor(eos_token_ids, device=generated.device))
    first_eos = is_eos.int().argmax(dim=1)  # 0 when a row has no eos; masked out below
    return torch.where(is_eos.any(dim=1), first_eos + 1, torch.full_like(first_eos, generated.shape[1]))


def generation_kwargs(sampling: SamplingSettings, prompt_length: int, do_sample: bool) -> dict:
    """Keyword arguments for ``generate`` from our settings; greedy decoding ignores the sampling knobs."""
    room = sampling.max_model_len - prompt_length
    if room < 1:
        raise ValueError(
            f"The prompts are {prompt_length} tokens long, leaving no room under max_model_len={sampling.max_model_len}; "
            "raise max_model_len or shorten the prompts."
        )
    max_new_tokens = min(sampling.max_output_tokens or room, room)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min(sampling.min_output_tokens, max_new_tokens),
        "do_sample": do_sample,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if do_sample:
        kwargs |= {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or 0,
            "min_p": sampling.min_p or None,
        }
    else:
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    return kwargs


def position_limit(model: nn.Module) -> int | None:
    """The model's own context limit (``max_position_embeddings``), or None when its config has none."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def context_limit(model: nn.Module, max_model_len: int) -> int:
    """The longest row a rollout may build: ``max_model_len``, capped by the model's own context limit."""
    limit = position_limit(model)
    return max_model_len if limit is None else min(max_model_len, limit)


def model_generation_kwargs(model: nn.Module, sampling: SamplingSettings, prompt_length: int, do_sample: bool) -> dict:
    """``generation_kwargs`` with the token budget also capped by the model's own context limit: positions past it
    have no embedding (or are untrained). Raises when the (padded) prompts already reach that limit."""
    kwargs = generation_kwargs(sampling, prompt_length, do_sample)
    limit = position_limit(model)
    if limit is not None:
        if prompt_length >= limit:
            raise ValueError(
                f"The prompts are {prompt_length} tokens long (padded), at or over the model's "
                f"max_position_embeddings={limit}; shorten the prompts (or filter long rows out of the dataset)."
            )
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], limit - prompt_length)
        kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], kwargs["max_new_tokens"])
    return kwargs


def generation_model(model: nn.Module) -> nn.Module:
    """The module whose ``generate`` to call: a PEFT model carrying plain LoRA unwraps to its transformers model.

    LoRA is injected into the transformers model's own layers, so generating through it applies the active adapter
    exactly as ``PeftModel.generate`` does. Other PEFT methods (prompt learning, aLoRA), which need PEFT's wrapper,
    keep it.
    """
    if not isinstance(model, PeftModel):
        return model
    config = model.active_peft_config
    if type(config) is LoraConfig and not getattr(config, "alora_invocation_tokens", None):
        return model.get_base_model()
    return model


def shared_prompt_cache(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int):
    """The KV cache of each prompt without its last token, computed once per prompt and repeated ``repeats`` times.

    Passing it to ``generate`` with the repeated prompts makes prefill encode only the last prompt token of each
    row. Positions follow ``generate``'s own rule (count of real tokens, 0 on padding), so the cache is the one
    ``generate`` would have built. Returns None when there is nothing to share (one completion per prompt, a
    one-token prompt) or the model's cache cannot be repeated; ``generate`` then prefills the usual way.
    """
    if repeats < 2 or prompt_ids.shape[1] < 2:
        return None
    mask = prompt_mask[:, :-1].long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    # The decoder stack alone: the prefix's logits are not needed.
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    backbone = backbone if isinstance(backbone, nn.Module) else model
    output = backbone(input_ids=prompt_ids[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True)
    cache = output_cache(output)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(repeats)
    return cache


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_completions: int,
    sampling: SamplingSettings,
    do_sample: bool,
    pad_token_id: int,
    eos_token_ids: list[int],
    chunk_size: int | None = None,
    synced_gpus: bool = False,
) -> ActionResult:
    """Sample ``num_completions`` completions per prompt with ``model.generate``.

    Args:
        model: a causal LM (the PEFT model, with the adapter to sample from active).
        prompt_ids: (B, P) left-padded prompt ids.
        prompt_mask: (B, P) real prompt tokens.
        num_completions: G, completions per prompt; rows of a group are contiguous in the result.
        chunk_size: prompts per ``generate`` call; None generates all prompts at once.
        synced_gpus: keep generating until every process is done (ZeRO-3: each forward gathers the layers from
            all ranks, so no rank may stop early).

    Returns:
        An ``ActionResult`` with N = B * G rows.
    """
    batch, prompt_length = prompt_ids.shape
    chunk_size = chunk_size or batch
    generator = generation_model(model)
    kwargs = model_generation_kwargs(generator, sampling, prompt_length, do_sample)
    # ZeRO-3 needs generate's synchronised loop (no rank may stop early); exotic generation configs need generate
    use_lean_loop = not synced_gpus and lean_decoding_unsupported_reason(generator) is None
    decoding = DecodingSettings.from_generate_kwargs(kwargs) if use_lean_loop else None
    pieces = []
    for start in range(0, batch, chunk_size):
        chunk_ids, chunk_mask = prompt_ids[start : start + chunk_size], prompt_mask[start : start + chunk_size]
        cache = shared_prompt_cache(generator, chunk_ids, chunk_mask, num_completions)
        row_ids = chunk_ids.repeat_interleave(num_completions, dim=0)
        row_mask = chunk_mask.repeat_interleave(num_completions, dim=0).long()
        if decoding is not None:
            pieces.append(
                decode(
                    generator,
                    row_ids,
                    row_mask,
                    decoding,
                    eos_token_ids=eos_token_ids,
                    pad_token_id=pad_token_id,
                    prompt_cache=cache,
                )
            )
            continue
        output = generator.generate(
            input_ids=row_ids,
            attention_mask=row_mask,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_ids,
            synced_gpus=synced_gpus,
            **({CACHE_ARGUMENT: cache} if cache is not None else {}),
            **kwargs,
        )
        pieces.append(output[:, prompt_length:])
    width = max(piece.shape[1] for piece in pieces)
    generated = torch.cat([nn.functional.pad(p, (0, width - p.shape[1]), value=pad_token_id) for p in pieces])
    lengths = completion_lengths(generated, eos_token_ids)
    # Whatever generate wrote after a row's end is replaced by pad, so rows depend only on their kept tokens.
    keep = torch.arange(width, device=generated.device)[None, :] < lengths[:, None]
    generated = torch.where(keep, generated, torch.full_like(generated, pad_token_id))
    repeated_mask = prompt_mask.repeat_interleave(num_completions, dim=0)
    attention_mask, action_masks = masks_from_lengths(repeated_mask, lengths, width)
    completion_ids = torch.cat([prompt_ids.repeat_interleave(num_completions, dim=0), generated], dim=1)
    return ActionResult(
        completion_ids=completion_ids,
        action_masks=action_masks,
        attention_mask=attention_mask,
        prompt_length=prompt_length,
        completion_lengths=lengths,
    )


class HFRolloutEngine:
    """The ``RolloutEngine`` that generates with the agent's own model (HuggingFace ``generate``): it reads the live
    weights, so there is nothing to sync, and nothing to put to sleep.

    Prompts go to ``generate`` in chunks of the agent's ``hf_generate_chunk_size`` (None: all at once).
    """

    def generate(
        self,
        agent: LLMAlgorithm,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        num_completions: int,
        sampling: SamplingSettings,
        do_sample: bool,
    ) -> ActionResult:
        with agent.adapters.merged_for_sampling():
            return generate_completions(
                agent.actor,
                prompt_ids.to(agent.device),
                prompt_mask.to(agent.device),
                num_completions=num_completions,
                sampling=sampling,
                do_sample=do_sample,
                pad_token_id=agent.pad_token_id,
                eos_token_ids=eos_token_ids(agent.actor),
                chunk_size=getattr(agent, "hf_generate_chunk_size", None),
                synced_gpus=agent.dist.synced_generation,
            )

    def sync(self, agent: LLMAlgorithm) -> None:
        """Nothing to do: ``generate`` runs on the live model."""

    def sleep(self) -> None:
        """Nothing to release."""

    def wake(self) -> None:
        """Nothing to restore."""

    def attach(self, agent: LLMAlgorithm) -> None:
        """Every agent can generate with its own model."""

    def for_clone(self, clone: LLMAlgorithm) -> HFRolloutEngine:
        return HFRolloutEngine()


def eos_token_ids(model: nn.Module) -> list[int]:
    """The ids that end a completion: the generation config's eos id(s), else the model config's (a composite
    model such as Llava keeps it on its text config)."""
    eos = model.generation_config.eos_token_id
    for config in (model.config, model.config.get_text_config()):
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
    if eos is None:
        raise ValueError("The model defines no eos_token_id (generation_config or config); set one.")
    return [eos] if isinstance(eos, int) else list(eos)
