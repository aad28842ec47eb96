"""DPO: direct preference optimisation of the actor adapter against a frozen reference (Rafailov et al. 2023).

One learning step (``DPO.learn``):

1. reference sequence log-probs of every chosen and rejected completion, under no_grad, from the reference
   adapter (or the base model with adapters disabled when ``use_separate_reference_adapter=False``);
2. for each mini-batch of ``batch_size`` pairs, for each micro-batch: chosen and rejected rows stacked into
   one forward with grad -> summed completion log-probs (``losses.sequence_logprobs``) -> ``losses.dpo_loss``
   (``loss_type`` "sigmoid" | "ipo" | "hinge", optional label smoothing) -> backward; one optimizer step.

The loss is the mean over the pairs of the whole optimizer batch (micro-batch sums divided by the number of
pairs), so accumulation over micro-batches equals one big batch. Log-probs are summed over completion tokens,
as in the paper (IPO's paper averages them; we keep one convention for all three losses).

Loaded from an SFT checkpoint, the SFT actor becomes both the actor and the reference (see
``checkpoint/agent.py``), so the first loss of the "sigmoid" type is exactly log 2.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.envs.preference import PreferenceBatch, PreferenceGym
from agilerl_llm.losses import dpo_loss, sequence_logprobs
from agilerl_llm.model.liger_triton import require_liger_cross_entropy
from agilerl_llm.model.prefix_sharing import shared_prefix_length


class DPOSettings(BaseModel):
    """The DPO-specific hyperparameters, validated once at construction."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.1, gt=0.0, description="Inverse temperature of the implicit reward.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="Conservative DPO; sigmoid only.")

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> DPOSettings:
        if self.label_smoothing != 0.0 and self.loss_type != "sigmoid":
            raise ValueError(f'label_smoothing needs loss_type="sigmoid", got loss_type={self.loss_type!r}.')
        return self


class DPO(LLMAlgorithm):
    """Direct preference optimisation on a LoRA actor.

    Takes every argument of ``LLMAlgorithm`` plus ``beta``, ``loss_type`` and ``label_smoothing`` (``DPOSettings``).
    ``use_liger_loss=True`` computes the policy's and the reference's token log-probs with liger-kernel's fused
    linear cross-entropy (a Triton kernel: GPUs, or ``TRITON_INTERPRET=1``; ``model/liger_triton.py``).
    """

    hyperparameter_models = (DPOSettings,)

    fitness_metric: ClassVar[tuple[str, float]] = ("eval/accuracy", 1.0)

    def __init__(
        self,
        pad_token_id: int,
        pad_token: str,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        use_liger_loss: bool = False,
        **base_kwargs: Any,
    ) -> None:
        settings = DPOSettings(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        self.__dict__.update(settings.model_dump())
        self.use_liger_loss = use_liger_loss
        super().__init__(pad_token_id, pad_token, **base_kwargs)
        if use_liger_loss:
            require_liger_cross_entropy(self.device, "DPO")

    @property
    def uses_liger_cross_entropy(self) -> bool:
        return self.use_liger_loss

    def learn(self, experiences: PreferenceBatch) -> dict[str, float]:
        """One pass over the pairs of ``experiences`` in optimizer steps of ``batch_size`` pairs.

        Returns:
            ``loss/dpo`` (also ``mean_loss``), ``rewards/accuracy`` (share of pairs whose implicit reward
            prefers the chosen answer), ``rewards/margin``, ``rewards/chosen``, ``rewards/rejected``,
            ``logps/chosen``, ``logps/rejected`` (mean summed log-probs), ``grad_norm`` and ``lr``; all
            averaged over the optimizer steps.
        """
        if not isinstance(experiences, PreferenceBatch):
            raise ValueError(
                f"DPO.learn takes a PreferenceBatch (from PreferenceGym), got {type(experiences).__name__}."
            )
        ref_chosen, ref_rejected = self._sequence_logprobs(experiences, policy="reference")
        self.set_training_mode(True)
        totals: dict[str, float] = {}
        steps = 0
        for start in range(0, experiences.num_pairs, self.batch_size):
            pairs = torch.arange(start, min(start + self.batch_size, experiences.num_pairs))
            metrics = self._optimise_mini_batch(experiences.select(pairs), ref_chosen[pairs], ref_rejected[pairs])
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
        metrics = {key: value / steps for key, value in totals.items()}
        metrics["mean_loss"] = metrics["loss/dpo"]
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _optimise_mini_batch(
        self, mini_batch: PreferenceBatch, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
    ) -> dict[str, float]:
        """Accumulate the DPO loss over micro-batches of pairs, then take one optimizer step."""
        num_pairs = self.dist.all_reduce_sum(torch.tensor(float(mini_batch.num_pairs), device=self.device))
        sums = dict.fromkeys(("loss/dpo", "rewards/accuracy", "rewards/margin", "rewards/chosen",
                              "rewards/rejected", "logps/chosen", "logps/rejected"), 0.0)  # fmt: skip
        for start in range(0, mini_batch.num_pairs, self.micro_batch_size_per_gpu):
            pairs = torch.arange(start, min(start + self.micro_batch_size_per_gpu, mini_batch.num_pairs))
            micro = mini_batch.select(pairs)
            stacked = micro.stacked()
            logprobs = self.get_logprobs(
                stacked.input_ids,
                stacked.attention_mask,
                requires_grad=True,
                prefix_length=shared_prefix_length(stacked.loss_mask),  # a pair's rows share the prompt
            )
            chosen, rejected = sequence_logprobs(logprobs, stacked.loss_mask.to(self.device)).chunk(2)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen,
                rejected,
                ref_chosen[pairs],
                ref_rejected[pairs],
                self.beta,
                self.loss_type,
                self.label_smoothing,
            )
            loss = losses.sum() / num_pairs
            self._backward(loss)
            sums["loss/dpo"] += float(loss.detach())
            sums["rewards/accuracy"] += float((chosen_rewards > rejected_rewards).float().sum() / num_pairs)
            sums["rewards/margin"] += float((chosen_rewards - rejected_rewards).sum() / num_pairs)
            sums["rewards/chosen"] += float(chosen_rewards.sum() / num_pairs)
            sums["rewards/rejected"] += float(rejected_rewards.sum() / num_pairs)
            sums["logps/chosen"] += float(chosen.detach().sum() / num_pairs)
            sums["logps/rejected"] += float(rejected.detach().sum() / num_pairs)
        sums = self.dist.sum_floats(sums)  # each is normalised by the global pair count: the sum is global
        sums["grad_norm"] = self._optimizer_step()
        return sums

    def _sequence_logprobs(self, batch: PreferenceBatch, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) chosen and (B,) rejected summed completion log-probs under ``policy``, without grad."""
        self.set_training_mode(False)
        stacked = batch.stacked()
        # Scored in pair order (chosen 0, rejected 0, chosen 1, ...), so the micro-batches of get_logprobs keep a
        # pair's two rows together and they encode their prompt once.
        pair_order = torch.arange(2 * batch.num_pairs).view(2, -1).T.reshape(-1)
        logprobs = self.get_logprobs(
            stacked.input_ids[pair_order],
            stacked.attention_mask[pair_order],
            policy=policy,
            prefix_length=shared_prefix_length(stacked.loss_mask),
        )[pair_order.argsort().to(self.device)]
        chosen, rejected = sequence_logprobs(logprobs, stacked.loss_mask.to(self.device)).chunk(2)
        return chosen, rejected

    @torch.no_grad()
    def evaluate(self, env: PreferenceGym) -> dict[str, float]:
        """DPO loss, reward accuracy and margin over the whole held-out split (``eval/...``).

        Under several processes each rank scores its share and the sums are reduced: every rank gets the same.
        """
        losses, accurate, margins, counts = [], [], [], []
        for batch, counted in env.sharded_test_batches():
            ref_chosen, ref_rejected = self._sequence_logprobs(batch, policy="reference")
            chosen, rejected = self._sequence_logprobs(batch, policy="actor")
            loss, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing
            )
            losses.append(loss)
            accurate.append((chosen_rewards > rejected_rewards).float())
            margins.append(chosen_rewards - rejected_rewards)
            counts.append(counted.to(chosen.device))
        counted = torch.cat(counts)
        totals = self.dist.sum_floats(
            {
                "pairs": float(counted.sum()),
                "loss": float(torch.cat(losses)[counted].sum()),
                "accuracy": float(torch.cat(accurate)[counted].sum()),
                "margin": float(torch.cat(margins)[counted].sum()),
            }
        )
        pairs = max(totals["pairs"], 1.0)
        return {f"eval/{name}": totals[name] / pairs for name in ("loss", "accuracy", "margin")}

    def test(self, env: PreferenceGym, loop: int = 1) -> torch.Tensor:
        """Held-out reward accuracy as a 0-d tensor; it is appended to ``fitness``."""
        accuracy = self.evaluate(env)["eval/accuracy"]
        self.fitness.append(accuracy)
        return torch.tensor(accuracy)
