"""Update machinery shared by the policy-gradient algorithms (GRPO family, REINFORCE, PPO).

One ``learn()`` call runs ``update_epochs`` passes over the experience; each pass shuffles the rows and
cuts them into mini-batches of ``batch_size`` rows; each mini-batch is one optimizer step over gradients
accumulated across micro-batches of ``micro_batch_size_per_gpu`` rows. Losses are normalised by the
action tokens of the whole mini-batch summed over ranks, so accumulation and the number of processes change
nothing numerically (``agilerl_llm.distributed`` defines the step).

Under several processes every rank takes the same number of optimizer steps: the rank with the most rows sets
it, and a rank out of rows contributes nothing to a step. Under DeepSpeed every forward and backward is a
collective, so every rank must hold the same number of rows (``check_equal_rows``). The metrics returned are
global: the same on every rank, and equal to one process's.

The algorithms keep what differs (advantages, the objective's options, extra losses); the loops here
are written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from agilerl_llm.algorithms.experience import Experience, micro_batches, place_on_action_tokens
from agilerl_llm.distributed import DEEPSPEED
from agilerl_llm.losses import PolicyLossOutput, grpo_policy_loss, vllm_importance_weights
from agilerl_llm.model.adapters import ACTOR
from agilerl_llm.model.forward import attended_columns
from agilerl_llm.model.liger import liger_grpo_loss, liger_token_ppo_loss, liger_unsupported_reason, row_advantages
from agilerl_llm.model.prefix_sharing import shared_prefix_length, window_prefix
from agilerl_llm.utils.notices import warn_once

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm


def run_update_epochs(
    num_rows: int,
    *,
    batch_size: int,
    update_epochs: int,
    optimise_mini_batch: Callable[[torch.Tensor], dict[str, float]],
    agent: LLMAlgorithm | None = None,
) -> dict[str, float]:
    """Shuffled mini-batches for ``update_epochs`` passes; returns each metric averaged over optimizer steps.

    ``optimise_mini_batch`` receives the mini-batch's row indices (so per-row tensors kept outside the
    ``Experience``, such as PPO's old values and returns, are selected alongside it); under several processes
    (``agent`` given) it may receive no rows, when another rank still has some.
    """
    global_rows = num_rows
    if agent is not None:
        global_rows = agent.dist.max_int(num_rows)
        check_equal_rows(agent, num_rows, global_rows)
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(update_epochs):
        order = torch.randperm(num_rows)
        for start in range(0, global_rows, batch_size):
            for key, value in optimise_mini_batch(order[start : start + batch_size]).items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
    return {key: value / steps for key, value in totals.items()}


def check_equal_rows(agent: LLMAlgorithm, num_rows: int, most: int) -> None:
    """Under DeepSpeed with several processes, refuse ranks holding different numbers of rows (their forward and
    backward passes are collectives that would wait on each other forever). ``most``: the largest ``num_rows``."""
    if agent.dist.backend != DEEPSPEED or agent.dist.world_size == 1:
        return
    fewest = -agent.dist.max_int(-num_rows)
    if most != fewest:
        raise ValueError(
            f"under DeepSpeed every process must learn from the same number of rows; they hold {fewest} to {most}. "
            "Give every rank an equal share of the batch (the finetune loops and envs do)."
        )


def token_normaliser(agent: LLMAlgorithm, mini_batch: Experience) -> torch.Tensor:
    """Action tokens in the mini-batch, summed over ranks (at least 1): the loss denominator."""
    num_tokens = agent.dist.all_reduce_sum(mini_batch.action_mask.sum().float())
    return num_tokens.clamp(min=1.0)


def no_grad_logprobs(agent: LLMAlgorithm, batch: Experience, policy: str) -> torch.Tensor:
    """(N, T) log-probs of ``batch`` under ``policy`` ("actor" or "reference") at the sampling temperature."""
    agent.set_training_mode(False)
    return agent.get_logprobs(
        batch.completion_ids,
        batch.attention_mask,
        policy=policy,
        temperature=agent.temperature,
        prefix_length=shared_prefix_length(batch.action_mask),
    )


def with_behaviour_logprobs(agent: LLMAlgorithm, batch: Experience, beta: float) -> Experience:
    """Add ``old_logprobs`` (skipped when one on-policy step covers the batch) and ``ref_logprobs`` (when beta > 0).

    With one epoch and one mini-batch the behaviour policy is the current one, so the ratio is exactly 1 and
    the surrogate uses ``logprobs.detach()`` instead of a second forward pass.
    """
    single_pass = agent.update_epochs == 1 and batch.num_rows <= agent.batch_size
    return batch.with_fields(
        old_logprobs=None if single_pass else no_grad_logprobs(agent, batch, "actor"),
        ref_logprobs=no_grad_logprobs(agent, batch, "reference") if beta > 0 else None,
    )


def with_mismatch_weights(
    agent: LLMAlgorithm, batch: Experience, sampling_logps: list[torch.Tensor | None] | None
) -> Experience:
    """Add ``token_weights``, the rollout/trainer mismatch correction, when the rollout reported sampling log-probs.

    The weight of an action token is ``min(exp(trainer - sampling), vllm_importance_sampling_cap)``, both log-probs
    under the same processing (temperature, min-p, top-k, top-p): the trainer's side is the actor before this
    update, the sampling side what the engine reported. Rows given no log-probs (None) keep weight 1. Off when
    ``vllm_importance_sampling_correction`` is False or ``sampling_logps`` is None.
    """
    if sampling_logps is None or not agent.vllm_importance_sampling_correction:
        return batch
    sampling, given = place_on_action_tokens(sampling_logps, batch.action_mask)
    agent.set_training_mode(False)
    trainer = agent.get_logprobs(
        batch.completion_ids,
        batch.attention_mask,
        sampling=agent.sampling_settings(),
        prefix_length=shared_prefix_length(batch.action_mask),
    )
    corrected = batch.action_mask & given[:, None]
    weights = vllm_importance_weights(trainer, sampling, agent.vllm_importance_sampling_cap, corrected)
    weights = torch.where(given[:, None], weights, batch.action_mask.to(weights.dtype))
    return batch.with_fields(token_weights=weights)


def learn_metrics(agent: LLMAlgorithm, metrics: dict[str, float], batch: Experience) -> dict[str, float]:
    """What ``learn()`` returns from ``run_update_epochs``'s averages: ``loss`` / ``kl`` renamed ``mean_loss`` /
    ``mean_kl``, the current ``lr`` and, with mismatch weights, ``is_weight_mean``."""
    renamed = {"loss": "mean_loss", "kl": "mean_kl"}
    result = {renamed.get(key, key): value for key, value in metrics.items()}
    return result | mismatch_metrics(agent, batch) | {"lr": agent.optimizer.param_groups[0]["lr"]}


def mismatch_metrics(agent: LLMAlgorithm, batch: Experience) -> dict[str, float]:
    """``is_weight_mean``: the mean mismatch weight over the global batch's action tokens (none without weights)."""
    if batch.token_weights is None:
        return {}
    totals = agent.dist.sum_floats(
        {"weights": float(batch.token_weights[batch.action_mask].sum()), "tokens": float(batch.action_mask.sum())}
    )
    return {"is_weight_mean": totals["weights"] / max(totals["tokens"], 1.0)}


# What policy_gradient_step returns (before grad_norm) on each path.
STANDARD_METRICS = ("loss", "kl", "clip_fraction", "ratio_mean", "entropy")
LIGER_METRICS = ("loss", "kl", "clip_fraction")


def policy_gradient_step(
    agent: LLMAlgorithm,
    mini_batch: Experience,
    *,
    loss_type: str,
    ratio_bounds: tuple[float, float],
    beta: float,
    importance_sampling_level: str = "token",
    use_kl_advantage_shaping: bool = False,
    activation_offload: bool = False,
) -> dict[str, float]:
    """One optimizer step of ``grpo_policy_loss`` (or, with ``use_liger_loss``, Liger's equivalent) over the
    micro-batches of ``mini_batch``.

    Returns summed ``STANDARD_METRICS`` (``LIGER_METRICS`` on the Liger path), each already a per-step value, since
    every micro-batch is normalised by the global mini-batch's token count, and summed over ranks; and ``grad_norm``.
    """
    normaliser = token_normaliser(agent, mini_batch)
    offload = (
        torch.autograd.graph.save_on_cpu(pin_memory=agent.device.type == "cuda")
        if activation_offload
        else contextlib.nullcontext()
    )
    liger = uses_liger(agent, mini_batch, loss_type, importance_sampling_level, use_kl_advantage_shaping)
    # Fixed keys, so a rank without rows sums the same dict; Liger gives no entropy or ratio mean, and those keys
    # are left out rather than reported as 0.
    sums = dict.fromkeys(LIGER_METRICS if liger else STANDARD_METRICS, 0.0)
    for micro in micro_batches(mini_batch, agent.micro_batch_size_per_gpu):
        with offload:
            if liger:
                loss, kl, clip_fraction = liger_micro_batch_loss(
                    agent, micro, normaliser, loss_type=loss_type, ratio_bounds=ratio_bounds, beta=beta
                )
                metrics = {"kl": kl, "clip_fraction": clip_fraction}
            else:
                loss, metrics = standard_micro_batch_loss(
                    agent,
                    micro,
                    normaliser,
                    loss_type=loss_type,
                    ratio_bounds=ratio_bounds,
                    beta=beta,
                    importance_sampling_level=importance_sampling_level,
                    use_kl_advantage_shaping=use_kl_advantage_shaping,
                )
            agent._backward(loss)
        sums["loss"] += float(loss.detach())
        for key, value in metrics.items():
            sums[key] += float(value)
    sums = agent.dist.sum_floats(sums)
    sums["grad_norm"] = agent._optimizer_step()
    return sums


def standard_micro_batch_loss(
    agent: LLMAlgorithm,
    micro: Experience,
    normaliser: torch.Tensor,
    *,
    loss_type: str,
    ratio_bounds: tuple[float, float],
    beta: float,
    importance_sampling_level: str,
    use_kl_advantage_shaping: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo_policy_loss`` on the actor's log-probs of one micro-batch: the loss and its ``kl``,
    ``clip_fraction``, ``ratio_mean`` and ``entropy``, each normalised by the step's token count."""
    logprobs, entropy = agent.get_logprobs(
        micro.completion_ids, micro.attention_mask, temperature=agent.temperature, requires_grad=True,
        return_entropy=True, prefix_length=shared_prefix_length(micro.action_mask),
    )  # fmt: skip
    output = grpo_policy_loss(
        logprobs,
        logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs,
        micro.ref_logprobs,
        micro.advantages,
        micro.action_mask,
        loss_type=loss_type,
        ratio_low=ratio_bounds[0],
        ratio_high=ratio_bounds[1],
        beta=beta,
        num_tokens_normalizer=normaliser,
        importance_sampling_level=importance_sampling_level,
        turn_ids=micro.turn_ids,
        use_kl_advantage_shaping=use_kl_advantage_shaping,
        token_weights=micro.token_weights,
    )
    return output.loss, {
        "kl": output.kl,
        "clip_fraction": output.clip_fraction,
        "ratio_mean": output.ratio_mean,
        "entropy": (entropy.detach() * micro.action_mask).sum() / normaliser,
    }


def uses_liger(
    agent: LLMAlgorithm, mini_batch: Experience, loss_type: str, importance_sampling_level: str, shaping: bool
) -> bool:
    """Whether this mini-batch's policy loss goes through Liger (``use_liger_loss`` and settings it reproduces
    exactly, ``model/liger.py``); when the agent asked for Liger and cannot have it, says why once."""
    if not getattr(agent, "use_liger_loss", False):
        return False
    reason = liger_unsupported_reason(loss_type, importance_sampling_level, shaping)
    if reason is None and row_advantages(mini_batch.advantages, mini_batch.action_mask) is None:
        reason = "the advantages differ between a row's tokens (turn advantages) and Liger takes one per row"
    if reason is not None:
        warn_once("liger_standard_path", f"use_liger_loss=True: {reason}; these updates use the standard path.")
        return False
    return True


def liger_micro_batch_loss(
    agent: LLMAlgorithm,
    micro: Experience,
    normaliser: torch.Tensor,
    *,
    loss_type: str,
    ratio_bounds: tuple[float, float],
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``liger_grpo_loss`` on one micro-batch: the actor's hidden states over the batch's non-padding columns
    (the same window ``get_logprobs`` scores), then Liger's fused head + loss."""
    window = ActorWindow(agent, micro)
    return liger_grpo_loss(
        window.hidden,
        window.weight,
        window.bias,
        window.target_ids,
        window.action_mask,
        row_advantages(window(micro.advantages), window.action_mask),
        window(micro.old_logprobs),
        window(micro.ref_logprobs),
        window(micro.token_weights),
        loss_type=loss_type,
        ratio_low=ratio_bounds[0],
        ratio_high=ratio_bounds[1],
        beta=beta,
        temperature=agent.temperature,
        num_tokens_normalizer=normaliser,
        world_size=agent.dist.world_size,
    )


def liger_ppo_policy_loss(
    agent: LLMAlgorithm, micro: Experience, normaliser: torch.Tensor, ratio_bounds: tuple[float, float]
) -> PolicyLossOutput:
    """PPO's policy loss on one micro-batch through ``liger_token_ppo_loss`` (per-token advantages)."""
    window = ActorWindow(agent, micro)
    return liger_token_ppo_loss(
        window.hidden,
        window.weight,
        window.bias,
        window.target_ids,
        window.action_mask,
        window(micro.advantages),
        window(micro.old_logprobs),
        window(micro.token_weights),
        ratio_low=ratio_bounds[0],
        ratio_high=ratio_bounds[1],
        temperature=agent.temperature,
        num_tokens_normalizer=normaliser,
    )


class ActorWindow:
    """The actor's final hidden states over a micro-batch's attended columns (the window ``get_logprobs``
    scores), with the head and the scored tokens; calling it cuts a (N, T) tensor to the same window."""

    def __init__(self, agent: LLMAlgorithm, micro: Experience) -> None:
        ids, attention = micro.completion_ids.to(agent.device), micro.attention_mask.to(agent.device)
        first, last = attended_columns(attention)
        self.scored = slice(first, last - 1)  # log-prob column j scores token j + 1
        self.device = agent.device
        with agent._policy_context(ACTOR):
            prefix = window_prefix(shared_prefix_length(micro.action_mask), first)
            self.hidden = agent.policy_forward(ids[:, first:last], attention[:, first:last], prefix_length=prefix)
            self.hidden = self.hidden[:, :-1]
        self.weight, self.bias = agent._output_head()
        self.target_ids = ids[:, first + 1 : last]
        self.action_mask = self(micro.action_mask)

    def __call__(self, values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[:, self.scored].to(self.device)
