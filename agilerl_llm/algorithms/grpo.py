"""GRPO, GSPO and CISPO: group-relative policy optimisation of an LLM's actor adapter.

One learning step, top to bottom (``GRPO.learn``):

1. rewards (B prompts x G completions) -> group-relative advantages on action tokens
   (``advantages.compute_grpo_token_advantages``); optionally drop rows with no signal;
2. behaviour ("old") and reference log-probs under no_grad;
3. for each epoch, for each mini-batch of ``batch_size`` rows, for each micro-batch:
   log-probs with grad -> ``losses.grpo_policy_loss`` -> backward; then one clipped optimizer step.

The objective is picked by ``loss_type``: "grpo" (DeepSeekMath, token-level clipped surrogate),
"gspo" (Zheng et al. 2025, the same surrogate on the length-normalised sequence ratio) and "cispo"
(MiniMax-M1 2025, clamped detached IS weight times log-prob). Where we deviate from the papers:

* the KL penalty uses the k3 estimator of KL(pi || pi_ref) on action tokens, added to the loss with
  weight ``beta`` (or folded into the advantages with ``use_kl_advantage_shaping``);
* the loss is the token mean over the whole optimizer batch (not a mean of per-sequence means), so
  gradient accumulation over micro-batches and ranks gives the same gradient as one big batch;
* when one update sees each row exactly once (``update_epochs=1`` and one mini-batch), the behaviour
  log-probs equal the current ones, so their extra no-grad forward is skipped.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agilerl_llm.advantages import compute_grpo_token_advantages, nonzero_advantage_rows, resolve_advantage_granularity
from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.algorithms.experience import Experience
from agilerl_llm.algorithms.generation import RolloutCorrectionSettings
from agilerl_llm.algorithms.updates import (
    learn_metrics,
    policy_gradient_step,
    run_update_epochs,
    with_behaviour_logprobs,
    with_mismatch_weights,
)
from agilerl_llm.distributed import DEEPSPEED
from agilerl_llm.losses import resolve_clip_bounds, resolve_importance_sampling_level
from agilerl_llm.rollout.base import SamplingSettings
from agilerl_llm.rollout.vllm import VLLMConfig


class GRPOSettings(BaseModel):
    """The GRPO-specific hyperparameters, validated once at construction."""

    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(default=8, ge=2)
    beta: float = Field(default=0.001, ge=0.0)
    clip_coef: float | tuple[float, float] = 0.2
    update_epochs: int = Field(default=1, ge=1)
    loss_type: Literal["grpo", "gspo", "cispo"] = "grpo"
    importance_sampling_level: Literal["token", "turn", "trajectory"] | None = None
    advantage_granularity: Literal["auto", "trajectory", "turn"] = "auto"
    adv_norm: Literal["mean_std", "mean_only"] = "mean_std"
    whiten_advantages: bool = False
    adv_clip_range: float | None = Field(default=None, gt=0.0)
    filter_zero_adv: bool = False
    adv_filter_eps: float = Field(default=0.0, ge=0.0)
    use_kl_advantage_shaping: bool = False

    @model_validator(mode="after")
    def _check_clip_coef(self) -> GRPOSettings:
        resolve_clip_bounds(self.clip_coef)  # raises ValueError naming clip_coef
        return self


class GRPO(LLMAlgorithm):
    """Group Relative Policy Optimization on a LoRA actor (``loss_type`` "grpo" | "gspo" | "cispo").

    Takes every argument of ``LLMAlgorithm`` plus the GRPO hyperparameters of ``GRPOSettings`` and the
    sampling settings of ``SamplingSettings`` (temperature, top_p, top_k, min_p, repetition_penalty,
    max_output_tokens, min_output_tokens, max_model_len), with the AgileRL names and defaults.
    """

    default_loss_type = "grpo"
    hyperparameter_models = (GRPOSettings, SamplingSettings, RolloutCorrectionSettings)

    def __init__(
        self,
        pad_token_id: int,
        pad_token: str,
        *,
        group_size: int = 8,
        beta: float = 0.001,
        clip_coef: float | tuple[float, float] = 0.2,
        update_epochs: int = 1,
        loss_type: str | None = None,
        importance_sampling_level: str | None = None,
        advantage_granularity: str = "auto",
        action_granularity: str | None = None,
        adv_norm: str = "mean_std",
        whiten_advantages: bool = False,
        adv_clip_range: float | None = None,
        filter_zero_adv: bool = False,
        adv_filter_eps: float = 0.0,
        use_kl_advantage_shaping: bool = False,
        temperature: float = 0.9,
        repetition_penalty: float = 1.0,
        top_p: float = 0.95,
        top_k: int | None = 50,
        min_p: float = 0.0,
        max_output_tokens: int | None = None,
        min_output_tokens: int = 0,
        max_model_len: int = 1024,
        hf_generate_chunk_size: int | None = None,
        use_liger_loss: bool = False,
        fused_loss_chunk_rows: int | None = None,
        use_sequence_packing: bool = False,
        use_memory_efficient_params: bool = True,
        activation_offload: bool = False,
        reduce_memory_peak: bool | None = None,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_cap: float = 2.0,
        use_vllm: bool = False,
        vllm_config: VLLMConfig | None = None,
        **base_kwargs: Any,
    ) -> None:
        if loss_type is not None and type(self) is not GRPO and loss_type != self.default_loss_type:
            raise ValueError(
                f"{type(self).__name__} pins loss_type={self.default_loss_type!r}; got loss_type={loss_type!r}. "
                "Use GRPO(loss_type=...) to choose another objective."
            )
        loss_type = loss_type or self.default_loss_type
        if action_granularity is not None:
            warnings.warn("action_granularity is deprecated; use advantage_granularity.", DeprecationWarning, 2)
            advantage_granularity = action_granularity
        if reduce_memory_peak is not None:
            warnings.warn("reduce_memory_peak is ignored; set micro_batch_size_per_gpu.", DeprecationWarning, 2)
        settings = GRPOSettings(
            group_size=group_size,
            beta=beta,
            clip_coef=clip_coef,
            update_epochs=update_epochs,
            loss_type=loss_type,
            importance_sampling_level=importance_sampling_level,
            advantage_granularity=advantage_granularity,
            adv_norm=adv_norm,
            whiten_advantages=whiten_advantages,
            adv_clip_range=adv_clip_range,
            filter_zero_adv=filter_zero_adv,
            adv_filter_eps=adv_filter_eps,
            use_kl_advantage_shaping=use_kl_advantage_shaping,
        )
        level, message = resolve_importance_sampling_level(settings.loss_type, settings.importance_sampling_level)
        if message:
            warnings.warn(message, UserWarning, 2)
        self.__dict__.update(settings.model_dump())
        self.importance_sampling_level = level
        self._store_generation_settings(
            hf_generate_chunk_size=hf_generate_chunk_size,
            use_liger_loss=use_liger_loss,
            use_vllm=use_vllm,
            vllm_config=vllm_config,
            vllm_importance_sampling_correction=vllm_importance_sampling_correction,
            vllm_importance_sampling_cap=vllm_importance_sampling_cap,
            use_memory_efficient_params=use_memory_efficient_params,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            max_output_tokens=max_output_tokens,
            min_output_tokens=min_output_tokens,
            max_model_len=max_model_len,
        )
        self.fused_loss_chunk_rows = fused_loss_chunk_rows
        self.activation_offload = activation_offload
        self.fitness: list[float] = []
        super().__init__(pad_token_id, pad_token, use_sequence_packing=use_sequence_packing, **base_kwargs)

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """(ratio_low, ratio_high) from ``clip_coef``."""
        return resolve_clip_bounds(self.clip_coef)

    # ------------------------------------------------------------------------------------------ learning
    def learn(
        self,
        experiences: Any,
        turn_ids: torch.Tensor | None = None,
        sampling_logps: list[torch.Tensor | None] | None = None,
    ) -> dict[str, float]:
        """One GRPO update from ``(completion_ids, action_masks, rewards[, attention_mask])`` or an ``Experience``.

        Returns:
            ``mean_loss`` and ``mean_kl`` (per optimizer step, averaged), plus ``clip_fraction``, ``entropy``,
            ``grad_norm``, ``ratio_mean``, ``rows_kept`` and ``lr``; with ``sampling_logps``, ``is_weight_mean`` (the
            mean vLLM mismatch weight on action tokens).
        """
        batch = Experience.from_input(experiences, self.pad_token_id, self.device)
        batch = with_mismatch_weights(self, batch, sampling_logps)
        granularity = resolve_advantage_granularity(self.advantage_granularity, self.importance_sampling_level)
        if granularity == "turn" and (turn_ids is None or batch.rewards.dim() != 2):
            warnings.warn(
                "advantage_granularity resolved to 'turn' but turn_ids or per-turn rewards are missing; "
                "using trajectory advantages.",
                UserWarning,
                2,
            )
        if self.importance_sampling_level == "turn" and turn_ids is None:
            raise ValueError('importance_sampling_level="turn" needs turn_ids in learn().')
        advantages = compute_grpo_token_advantages(
            batch.rewards,
            batch.action_mask,
            self.group_size,
            adv_norm=self.adv_norm,
            granularity=granularity,
            turn_ids=turn_ids,
            whiten=self.whiten_advantages,
            clip_range=self.adv_clip_range,
            batch_sum=self.dist.all_reduce_sum,
        )
        batch = batch.with_fields(advantages=advantages, turn_ids=turn_ids)
        if self.filter_zero_adv:
            batch = self._drop_rows_without_signal(batch)
        rows_kept = self.dist.sum_floats({"rows": float(batch.action_mask.any(dim=1).sum())})["rows"]
        if rows_kept == 0:  # on every rank: nothing anywhere has a learning signal
            return {"mean_loss": 0.0, "mean_kl": 0.0, "rows_kept": 0.0}
        batch = with_behaviour_logprobs(self, batch, self.beta)
        self.set_training_mode(True)
        metrics = run_update_epochs(
            batch.num_rows,
            batch_size=self.batch_size,
            update_epochs=self.update_epochs,
            optimise_mini_batch=lambda rows: policy_gradient_step(
                self,
                batch.select(rows),
                loss_type=self.loss_type,
                ratio_bounds=self.clip_bounds,
                beta=self.beta,
                importance_sampling_level=self.importance_sampling_level,
                use_kl_advantage_shaping=self.use_kl_advantage_shaping,
                activation_offload=self.activation_offload,
            ),
            agent=self,
        )
        return learn_metrics(self, metrics, batch) | {"rows_kept": rows_kept}

    def _drop_rows_without_signal(self, batch: Experience) -> Experience:
        """``filter_zero_adv``: rows whose advantages are all (near) zero leave the update.

        Under DeepSpeed with several processes they stay, with their action mask cleared: every rank must run the
        same forward and backward passes (they are collectives), and a row without action tokens adds nothing to
        the loss, the KL term or the token count, so the update is the same as with the rows dropped.
        """
        keep = nonzero_advantage_rows(batch.advantages, batch.action_mask, self.adv_filter_eps)
        if self.dist.backend != DEEPSPEED or self.dist.world_size == 1:
            return batch.select(keep)
        kept = torch.zeros(batch.num_rows, dtype=torch.bool, device=batch.action_mask.device)
        kept[keep] = True
        return batch.with_fields(action_mask=batch.action_mask & kept[:, None])


class GSPO(GRPO):
    """GRPO with the sequence-level (length-normalised) importance ratio: ``loss_type="gspo"``."""

    default_loss_type = "gspo"


class CISPO(GRPO):
    """GRPO with the clamped, detached importance weight times log-prob: ``loss_type="cispo"``."""

    default_loss_type = "cispo"
