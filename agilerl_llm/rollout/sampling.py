"""A lean decoding loop for the HF rollout engine: the model forward, our sampling settings, nothing else.

At the sizes RL fine-tuning samples at on a CPU (and for small models anywhere), ``generate``'s per-token
bookkeeping is a measurable share of a rollout: its logits-processor list inspects each processor's signature at
every step, top-k and top-p each select or sort over the whole vocabulary, ``torch.multinomial`` is slow on wide
rows, and each step rebuilds its model inputs. This loop does one forward per token with the cache, then one
``topk`` (or, without top-k, one sort) that serves top-k, top-p and min-p together, and samples by an exponential
race over the candidates (``argmax p / E`` with ``E ~ Exp(1)`` picks token k with probability ``p_k``: the same
distribution as ``multinomial``, without its cost).

What it means by each setting is what ``generate`` means (``tests/test_lean_sampling.py`` checks the processed
distribution against transformers' own logits processors, and greedy output token for token against
``generate``), with one deliberate difference: the repetition penalty counts the prompt's real tokens and the
generated ones, not the left padding (``generate`` also penalises the pad id, which is often the eos id).

It serves plain transformers models whose generation config asks for nothing beyond our settings
(``lean_decoding_unsupported_reason``); anything else (bad-word lists, forced tokens, n-gram blocking, a PEFT
wrapper that must run, ZeRO-3's synchronised generation) goes to ``generate``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from agilerl_llm.model.prefix_sharing import CACHE_ARGUMENT, output_cache

# Generation-config fields that make ``generate`` change the logits beyond our sampling settings; a model whose
# generation config sets any of them away from the default decodes through ``generate``.
_EXTRA_PROCESSING_FIELDS = (
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "force_words_ids",
    "constraints",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "remove_invalid_values",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "encoder_repetition_penalty",
    "guidance_scale",
    "watermarking_config",
    "min_length",
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "assistant_model",
    "prompt_lookup_num_tokens",
)


@dataclass(frozen=True)
class DecodingSettings:
    """What the loop applies to each step's logits, in ``generate``'s order: repetition penalty, the eos ban
    until ``min_new_tokens``, then (sampling only) temperature, top-k, top-p, min-p."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generate_kwargs(cls, kwargs: dict) -> DecodingSettings:
        """From the keyword arguments ``generation_kwargs`` builds for ``generate``."""
        sample = bool(kwargs["do_sample"])
        return cls(
            max_new_tokens=int(kwargs["max_new_tokens"]),
            min_new_tokens=int(kwargs.get("min_new_tokens") or 0),
            do_sample=sample,
            temperature=float(kwargs.get("temperature") or 1.0) if sample else 1.0,
            top_k=int(kwargs.get("top_k") or 0) if sample else 0,
            top_p=float(kwargs["top_p"]) if sample else 1.0,  # SamplingSettings validates 0 < top_p <= 1
            min_p=float(kwargs.get("min_p") or 0.0) if sample else 0.0,
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
        )


@functools.cache
def _default_generation_config() -> GenerationConfig:
    """transformers' defaults, built once: the check below runs at every rollout."""
    return GenerationConfig()


def lean_decoding_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``decode`` cannot stand in for ``model.generate`` (None when it can)."""
    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a transformers PreTrainedModel"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    defaults = _default_generation_config()
    changed = [
        name
        for name in _EXTRA_PROCESSING_FIELDS
        if getattr(config, name, None) not in (None, [], (), getattr(defaults, name, None))
    ]
    if changed:
        return f"its generation_config sets {changed}, which only generate() applies"
    return None


def penalise_repetition(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(N, V) scores, (N, V) bool tokens already in the row -> scores with those tokens' logits divided by
    ``penalty`` where positive and multiplied by it where negative (the CTRL penalty ``generate`` applies)."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def sampling_distribution(scores: torch.Tensor, settings: DecodingSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, V) processed logits -> ``(probs, token_of)``: each row's sampling probabilities over its candidate
    tokens, highest logit first, and the vocabulary id of each candidate (None: the candidates are the whole
    vocabulary in id order, when no truncation is asked for).

    Temperature, then top-k, then top-p (the smallest head whose mass reaches ``top_p``; the top token always
    stays), then min-p (tokens under ``min_p`` times the top probability go), each on what the previous left, as
    ``generate``'s warpers do. Top-k keeps exactly k candidates (``generate`` also keeps tokens tied with the k-th
    logit), so only they are sorted and drawn from: one ``topk`` instead of a sort of the vocabulary.
    """
    scores = scores / settings.temperature if settings.temperature != 1.0 else scores
    if 0 < settings.top_k < scores.shape[-1]:
        ordered, token_of = scores.topk(settings.top_k, dim=-1)
    elif settings.top_p < 1.0 or settings.min_p > 0.0:
        ordered, token_of = scores.sort(dim=-1, descending=True)
    else:
        return scores.softmax(dim=-1), None
    probs = ordered.softmax(dim=-1)
    if settings.top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the candidates ranked above each one
        probs = probs.masked_fill(mass_before >= settings.top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if settings.min_p > 0.0:
        probs = probs.masked_fill(probs < settings.min_p * probs[:, :1], 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, token_of


def sample_from(probs: torch.Tensor, token_of: torch.Tensor | None) -> torch.Tensor:
    """(N, K) probabilities of each row's candidates and their token ids (None: candidate k is token k) -> (N,)
    one token per row, drawn with probability ``probs`` by an exponential race (the global torch RNG, so seeded
    runs repeat)."""
    choice = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
    return (choice if token_of is None else token_of.gather(1, choice))[:, 0]


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: DecodingSettings,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    prompt_cache=None,
) -> torch.Tensor:
    """Generate up to ``settings.max_new_tokens`` tokens after each left-padded prompt.

    Args:
        model: a transformers causal LM (``lean_decoding_unsupported_reason(model)`` is None).
        input_ids: (N, P) left-padded prompts.
        attention_mask: (N, P) real prompt tokens.
        settings: what to apply to the logits, and whether to sample.
        eos_token_ids: a row ends after generating any of them (the eos is kept).
        pad_token_id: what a finished row generates afterwards.
        prompt_cache: the KV cache of ``input_ids[:, :-1]`` (``shared_prompt_cache``), or None to prefill here.

    Returns:
        (N, C) generated ids, C <= max_new_tokens: the loop stops once every row has ended.
    """
    rows, prompt_length = input_ids.shape
    device = input_ids.device
    total = prompt_length + settings.max_new_tokens
    mask = torch.ones((rows, total), dtype=torch.long, device=device)
    mask[:, :prompt_length] = attention_mask.long()
    positions = (mask[:, :prompt_length].cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_token_ids, device=device)
    seen = None
    if settings.repetition_penalty != 1.0:
        vocabulary = model.get_output_embeddings().weight.shape[0]
        # padding goes to an extra column, dropped after: only real prompt tokens count as seen
        seen = torch.zeros((rows, vocabulary + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.masked_fill(attention_mask == 0, vocabulary), True)
        seen = seen[:, :vocabulary].contiguous()
    if prompt_cache is None:
        step_ids, step_positions, cache_kwargs = input_ids, positions, {}
    else:
        step_ids, step_positions = input_ids[:, -1:], positions[:, -1:]
        cache_kwargs = {CACHE_ARGUMENT: prompt_cache}
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    generated = torch.full((rows, settings.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    last_position = positions[:, -1]
    steps = 0
    for step in range(settings.max_new_tokens):
        output = model(
            input_ids=step_ids,
            attention_mask=mask[:, : prompt_length + step],
            position_ids=step_positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs,
        )
        cache_kwargs = {CACHE_ARGUMENT: output_cache(output)}
        scores = output.logits[:, -1, :].float()
        if seen is not None:
            scores = penalise_repetition(scores, seen, settings.repetition_penalty)
        if step < settings.min_new_tokens:
            scores[:, eos] = float("-inf")
        if settings.do_sample:
            token = sample_from(*sampling_distribution(scores, settings))
        else:
            token = scores.argmax(dim=-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        generated[:, step] = token
        steps = step + 1
        if seen is not None:
            seen[torch.arange(rows, device=device), token] = True
        unfinished &= ~torch.isin(token, eos)
        if not unfinished.any():
            break
        last_position = last_position + 1
        step_ids, step_positions = token[:, None], last_position[:, None]
    return generated[:, :steps]
