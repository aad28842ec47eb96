"""LLMPPO: PPO with a learned critic (a ``critic`` LoRA adapter plus a linear value head) on a LoRA actor.

One learning step (``LLMPPO.learn``), top to bottom:

1. under no_grad: behaviour log-probs (actor), reference log-probs (when ``beta > 0``) and values (critic);
2. token rewards: the completion's reward on its last generated token minus ``beta * k3`` of
   KL(pi || pi_ref) on every generated token (``advantages.kl_penalised_token_rewards``, ``losses.kl_k3``);
3. GAE over the generated tokens only (``advantages.gae`` with ``gamma``, ``gae_lambda``), giving advantages
   and value targets; advantages are optionally whitened over the batch's action tokens;
4. for each epoch, for each mini-batch, for each micro-batch: actor log-probs with grad -> clipped surrogate
   (``losses.grpo_policy_loss``, the KL already in the reward); critic values with grad -> ``vf_coef`` x clipped
   value loss (``losses.clipped_value_loss``, ``cliprange_value``); one backward of ``policy + vf_coef * value``
   (with activation checkpointing, two: each loss's backward while its own adapter is active); then one clipped
   optimizer step.

Where we deviate from classic RLHF PPO (Ouyang et al. 2022): the per-token KL penalty is the k3 estimator,
the package's one KL estimator, instead of the log-ratio; the value head reads the critic adapter's final
hidden state (a separate forward from the actor's, over the same frozen base). The value head lives inside
the training forward module (``HiddenStatesModel.value_head``), so it is trained by the same optimizer (and, under
DeepSpeed, the same engine) as the adapters, and ``max_grad_norm`` clips all of them by one global norm.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agilerl_llm.advantages import gae, kl_penalised_token_rewards, whiten_token_advantages
from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.algorithms.experience import Experience
from agilerl_llm.algorithms.generation import RolloutCorrectionSettings
from agilerl_llm.algorithms.updates import (
    liger_ppo_policy_loss,
    mismatch_metrics,
    run_update_epochs,
    with_mismatch_weights,
)
from agilerl_llm.checkpoint.state import CheckpointModule
from agilerl_llm.distributed import is_partitioned
from agilerl_llm.losses import clipped_value_loss, grpo_policy_loss, kl_k3, resolve_clip_bounds
from agilerl_llm.model.adapters import CRITIC
from agilerl_llm.model.forward import HiddenStatesModel
from agilerl_llm.model.prefix_sharing import shared_prefix_length
from agilerl_llm.model.value_head import ValueHead
from agilerl_llm.rollout.base import SamplingSettings
from agilerl_llm.rollout.vllm import VLLMConfig


class PPOSettings(BaseModel):
    """The PPO-specific hyperparameters, validated once at construction."""

    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(default=1, ge=1, description="Completions sampled per prompt.")
    beta: float = Field(default=0.01, ge=0.0, description="Per-token KL penalty in the reward; 0 disables it.")
    clip_coef: float | tuple[float, float] = Field(default=0.2, description="Policy ratio clip.")
    vf_coef: float = Field(default=0.5, ge=0.0, description="Weight of the value loss.")
    cliprange_value: float | None = Field(default=0.2, gt=0.0, description="Value clip range; None disables it.")
    gamma: float = Field(default=1.0, ge=0.0, le=1.0, description="Discount over generated tokens.")
    gae_lambda: float = Field(default=0.95, ge=0.0, le=1.0, description="GAE lambda.")
    update_epochs: int = Field(default=1, ge=1, description="Passes over each batch.")
    whiten_advantages: bool = Field(default=True, description="Standardise advantages over the batch's action tokens.")

    @model_validator(mode="after")
    def _check_clip_coef(self) -> PPOSettings:
        resolve_clip_bounds(self.clip_coef)  # raises ValueError naming clip_coef
        return self


class LLMPPO(LLMAlgorithm):
    """PPO on a LoRA actor with a LoRA critic and a value head.

    Takes every argument of ``LLMAlgorithm``, the hyperparameters of ``PPOSettings`` and the sampling settings of
    ``SamplingSettings``. ``use_liger_loss=True`` computes the policy loss through Liger's chunked PPO base
    with per-token advantages (``model/liger.py liger_token_ppo_loss``); the value loss is unchanged.
    """

    uses_critic = True
    hyperparameter_models = (PPOSettings, SamplingSettings, RolloutCorrectionSettings)

    def zero3_refusal(self) -> str | None:
        # Measured (tests/test_distributed_training.py): with two backward passes per micro-batch through different
        # adapters, ZeRO-3's second optimizer step gets a wrong gradient (norm 1.48 vs 0.98 in one process); with one
        # backward it matches. Two passes are needed only with activation checkpointing (see _optimise_mini_batch).
        if self.gradient_checkpointing:
            return (
                "with gradient_checkpointing=True: its two backward passes per micro-batch (actor, then critic) get "
                "wrong gradients there from the second optimizer step on; pass gradient_checkpointing=False (one "
                "backward pass, which ZeRO-3 gets right)."
            )
        return None

    def __init__(
        self,
        pad_token_id: int,
        pad_token: str,
        *,
        group_size: int = 1,
        beta: float = 0.01,
        clip_coef: float | tuple[float, float] = 0.2,
        vf_coef: float = 0.5,
        cliprange_value: float | None = 0.2,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        update_epochs: int = 1,
        whiten_advantages: bool = True,
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
        settings = PPOSettings(
            group_size=group_size,
            beta=beta,
            clip_coef=clip_coef,
            vf_coef=vf_coef,
            cliprange_value=cliprange_value,
            gamma=gamma,
            gae_lambda=gae_lambda,
            update_epochs=update_epochs,
            whiten_advantages=whiten_advantages,
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

    # ------------------------------------------------------------------------------------------ critic
    def checkpoint_modules(self) -> dict[str, CheckpointModule]:
        """The value head travels with the critic adapter (``modules/value_head.safetensors``)."""
        return {"value_head": CheckpointModule(self.value_head, follows_adapter=CRITIC)}

    def make_policy_forward(self, actor: Any) -> HiddenStatesModel:
        """The training forward with the value head inside it (one module for the accelerator to wrap)."""
        weight = actor.get_base_model().get_output_embeddings().weight
        hidden_size = int((weight.ds_shape if is_partitioned(weight) else weight.shape)[1])
        value_head = ValueHead(hidden_size).to(self.device)
        return HiddenStatesModel(
            actor, self.calc_position_embeddings, value_head=value_head, sequence_packing=self.packs_sequences
        )

    @property
    def value_head(self) -> ValueHead:
        """The critic's value head (a submodule of the training forward)."""
        return self.policy_forward_module.value_head

    def get_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_length: int | None = None
    ) -> torch.Tensor:
        """Critic values without grad: (N, S) ids -> (N, S-1), position t valuing the prefix up to token t.

        Aligned with the log-probs: position t is the state from which token t + 1 is chosen. ``prefix_length``
        as for ``get_logprobs``.
        """
        chunks = []
        with torch.no_grad(), self.select_adapter(CRITIC):
            for start in range(0, input_ids.shape[0], self.micro_batch_size_per_gpu):
                rows = slice(start, start + self.micro_batch_size_per_gpu)
                chunks.append(self._critic_forward(input_ids[rows], attention_mask[rows], prefix_length))
        return torch.cat(chunks)

    def _critic_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_length: int | None = None
    ) -> torch.Tensor:
        """(N, S) -> (N, S-1) values; call with the critic adapter active."""
        return self.policy_forward(
            input_ids.to(self.device), attention_mask.to(self.device), values=True, prefix_length=prefix_length
        )

    # ------------------------------------------------------------------------------------------ learning
    def learn(
        self,
        experiences: Any,
        sampling_logps: list[torch.Tensor | None] | None = None,
        turn_ids: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One PPO update from ``(completion_ids, action_masks, rewards[, attention_mask])`` or an ``Experience``.

        Multi-turn batches: with per-turn rewards (N, K) and ``turn_ids`` (N, T), each turn's reward sits on the
        last token of its turn and GAE runs across the turns; per-turn rewards without ``turn_ids`` are summed onto
        the last action token (the episode return as one outcome).

        Returns:
            ``mean_loss`` (policy + vf_coef * value), ``mean_kl`` (k3 per action token at rollout time),
            ``value_loss``, ``policy_loss``, ``clip_fraction``, ``ratio_mean``, ``grad_norm``, ``value_mean``,
            ``return_mean`` and ``lr``.
        """
        batch = Experience.from_input(experiences, self.pad_token_id, self.device)
        batch = with_mismatch_weights(self, batch, sampling_logps)
        rewards = batch.rewards
        if rewards.dim() == 2 and turn_ids is None:
            rewards = rewards.sum(dim=1)
        if turn_ids is not None:
            turn_ids = turn_ids.to(self.device)
        mask = batch.action_mask
        self.set_training_mode(False)
        prefix = shared_prefix_length(mask)
        old_logprobs = self.get_logprobs(
            batch.completion_ids, batch.attention_mask, temperature=self.temperature, prefix_length=prefix
        )
        old_values = self.get_values(batch.completion_ids, batch.attention_mask, prefix)
        kl = None
        if self.beta > 0:
            ref = self.get_logprobs(
                batch.completion_ids,
                batch.attention_mask,
                policy="reference",
                temperature=self.temperature,
                prefix_length=prefix,
            )
            kl = kl_k3(torch.where(mask, old_logprobs, 0.0), torch.where(mask, ref, 0.0))
        token_rewards = kl_penalised_token_rewards(rewards, mask, kl, self.beta, turn_ids=turn_ids)
        advantages, returns = gae(token_rewards, old_values, mask, self.gamma, self.gae_lambda)
        if self.whiten_advantages:
            advantages = whiten_token_advantages(advantages, mask, batch_sum=self.dist.all_reduce_sum)
        batch = batch.with_fields(advantages=advantages, old_logprobs=old_logprobs)
        self.set_training_mode(True)
        metrics = run_update_epochs(
            batch.num_rows,
            batch_size=self.batch_size,
            update_epochs=self.update_epochs,
            optimise_mini_batch=lambda rows: self._optimise_mini_batch(batch, old_values, returns, rows),
            agent=self,
        )
        totals = self.dist.sum_floats(  # over the global batch
            {
                "actions": float(mask.sum()),
                "kl": float(kl[mask].sum()) if kl is not None else 0.0,
                "value": float(old_values[mask].sum()),
                "return": float(returns[mask].sum()),
            }
        )
        num_actions = max(totals["actions"], 1.0)
        return (
            metrics
            | mismatch_metrics(self, batch)
            | {
                "mean_kl": totals["kl"] / num_actions,
                "value_mean": totals["value"] / num_actions,
                "return_mean": totals["return"] / num_actions,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
        )

    def _optimise_mini_batch(
        self, batch: Experience, old_values: torch.Tensor, returns: torch.Tensor, rows: torch.Tensor
    ) -> dict[str, float]:
        """Accumulate policy + value gradients over micro-batches of ``rows``, then take one optimizer step."""
        normalizer = self.dist.all_reduce_sum(batch.action_mask[rows].sum().float()).clamp(min=1.0)
        ratio_low, ratio_high = resolve_clip_bounds(self.clip_coef)
        sums = dict.fromkeys(("mean_loss", "policy_loss", "value_loss", "clip_fraction", "ratio_mean"), 0.0)
        for start in range(0, len(rows), self.micro_batch_size_per_gpu):
            micro_rows = rows[start : start + self.micro_batch_size_per_gpu]
            micro = batch.select(micro_rows)
            prefix = shared_prefix_length(micro.action_mask)
            if self.use_liger_loss:
                policy = liger_ppo_policy_loss(self, micro, normalizer, (ratio_low, ratio_high))
            else:
                logprobs = self.get_logprobs(
                    micro.completion_ids,
                    micro.attention_mask,
                    temperature=self.temperature,
                    requires_grad=True,
                    prefix_length=prefix,
                )
                policy = grpo_policy_loss(
                    logprobs,
                    micro.old_logprobs,
                    None,
                    micro.advantages,
                    micro.action_mask,
                    loss_type="grpo",
                    ratio_low=ratio_low,
                    ratio_high=ratio_high,
                    beta=0.0,
                    num_tokens_normalizer=normalizer,
                    token_weights=micro.token_weights,
                )
            # With activation checkpointing each backward must run while its own adapter is active (the forward is
            # recomputed in backward with whichever adapter is active then): two passes. Without it one backward
            # serves both losses (each forward's graph already holds the adapter it ran with).
            two_passes = self.gradient_checkpointing
            if two_passes:
                self._backward(policy.loss)
            with self.select_adapter(CRITIC):
                values = self._critic_forward(micro.completion_ids, micro.attention_mask, prefix)
                value_loss = clipped_value_loss(
                    values,
                    old_values[micro_rows],
                    returns[micro_rows],
                    micro.action_mask,
                    self.cliprange_value,
                    normalizer,
                )
                self._backward(self.vf_coef * value_loss if two_passes else policy.loss + self.vf_coef * value_loss)
            sums["mean_loss"] += float(policy.loss.detach() + self.vf_coef * value_loss.detach())
            sums["policy_loss"] += float(policy.policy_loss)
            sums["value_loss"] += float(value_loss.detach())
            sums["clip_fraction"] += float(policy.clip_fraction)
            sums["ratio_mean"] += float(policy.ratio_mean)
        sums = self.dist.sum_floats(sums)  # each is normalised by the global token count: the sum is global
        sums["grad_norm"] = self._optimizer_step()
        return sums
