"""LLMReinforce: REINFORCE on whole completions with Return Batch Normalisation (ReBN).

One learning step (``LLMReinforce.learn``), top to bottom:

1. each completion's return (the sum of its rewards) is standardised across the *whole batch*
   (``advantages.return_batch_normalisation``), not per prompt group, and placed on its action tokens;
2. behaviour ("old") log-probs when the batch is visited more than once, reference log-probs when ``beta > 0``;
3. for each epoch, for each mini-batch of ``batch_size`` rows, for each micro-batch: log-probs with grad ->
   policy loss -> backward; then one clipped optimizer step.

The policy loss is ``losses.grpo_policy_loss`` with the token-level clipped surrogate: with one pass over
the batch the ratio is exactly 1, so its gradient is REINFORCE's ``-A grad log pi``; with ``update_epochs > 1``
(or several mini-batches) the ratio to the behaviour policy is clipped PPO-style to ``clip_coef``
(``clip_coef=None`` keeps the importance weight unclipped). The optional KL penalty is ``beta * k3`` of
KL(pi || pi_ref), the one estimator of the package. The loss is the token mean over the optimizer batch.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agilerl_llm.advantages import broadcast_to_tokens, return_batch_normalisation
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
from agilerl_llm.losses import resolve_clip_bounds
from agilerl_llm.rollout.base import SamplingSettings
from agilerl_llm.rollout.vllm import VLLMConfig


class ReinforceSettings(BaseModel):
    """The REINFORCE-specific hyperparameters, validated once at construction."""

    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(default=1, ge=1, description="Completions sampled per prompt.")
    beta: float = Field(default=0.0, ge=0.0, description="Weight of the k3 KL penalty; 0 disables it.")
    update_epochs: int = Field(default=1, ge=1, description="Passes over each batch; > 1 enables ratio clipping.")
    clip_coef: float | tuple[float, float] | None = Field(default=0.2, description="Ratio clip; None disables it.")
    rebn_eps: float = Field(default=1e-6, ge=0.0, description="Added to the batch standard deviation in ReBN.")

    @model_validator(mode="after")
    def _check_clip_coef(self) -> ReinforceSettings:
        if self.clip_coef is not None:
            resolve_clip_bounds(self.clip_coef)  # raises ValueError naming clip_coef
        return self


class LLMReinforce(LLMAlgorithm):
    """REINFORCE with return batch normalisation on a LoRA actor.

    Takes every argument of ``LLMAlgorithm``, the hyperparameters of ``ReinforceSettings`` and the sampling
    settings of ``SamplingSettings`` (temperature, top_p, top_k, min_p, repetition_penalty, max_output_tokens,
    min_output_tokens, max_model_len).
    """

    hyperparameter_models = (ReinforceSettings, SamplingSettings, RolloutCorrectionSettings)

    def __init__(
        self,
        pad_token_id: int,
        pad_token: str,
        *,
        group_size: int = 1,
        beta: float = 0.0,
        update_epochs: int = 1,
        clip_coef: float | tuple[float, float] | None = 0.2,
        rebn_eps: float = 1e-6,
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
        use_vllm: bool = False,
        vllm_config: VLLMConfig | None = None,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_cap: float = 2.0,
        use_memory_efficient_params: bool = True,
        **base_kwargs: Any,
    ) -> None:
        settings = ReinforceSettings(
            group_size=group_size, beta=beta, update_epochs=update_epochs, clip_coef=clip_coef, rebn_eps=rebn_eps
        )
        self.__dict__.update(settings.model_dump())
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
        super().__init__(pad_token_id, pad_token, **base_kwargs)

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """(ratio_low, ratio_high); unbounded when ``clip_coef`` is None."""
        return (0.0, float("inf")) if self.clip_coef is None else resolve_clip_bounds(self.clip_coef)

    def compute_advantages(self, batch: Experience) -> torch.Tensor:
        """(N, T) token advantages: the batch-normalised return of each row on its action tokens."""
        returns = batch.rewards.sum(dim=1) if batch.rewards.dim() == 2 else batch.rewards
        normalised = return_batch_normalisation(returns, self.rebn_eps, batch_sum=self.dist.all_reduce_sum)
        return broadcast_to_tokens(normalised, batch.action_mask)

    def learn(self, experiences: Any, sampling_logps: list[torch.Tensor | None] | None = None) -> dict[str, float]:
        """One REINFORCE update from ``(completion_ids, action_masks, rewards[, attention_mask])`` or an ``Experience``.

        Returns:
            ``mean_loss`` and ``mean_kl`` (averaged over optimizer steps), ``clip_fraction``, ``ratio_mean``,
            ``entropy``, ``grad_norm`` and ``lr``.
        """
        batch = Experience.from_input(experiences, self.pad_token_id, self.device)
        batch = with_mismatch_weights(self, batch, sampling_logps)
        batch = batch.with_fields(advantages=self.compute_advantages(batch))
        batch = with_behaviour_logprobs(self, batch, self.beta)
        self.set_training_mode(True)
        metrics = run_update_epochs(
            batch.num_rows,
            batch_size=self.batch_size,
            update_epochs=self.update_epochs,
            optimise_mini_batch=lambda rows: policy_gradient_step(
                self, batch.select(rows), loss_type="grpo", ratio_bounds=self.clip_bounds, beta=self.beta
            ),
            agent=self,
        )
        return learn_metrics(self, metrics, batch)
