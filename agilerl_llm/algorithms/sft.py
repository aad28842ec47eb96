"""SFT: supervised fine-tuning of the actor adapter on demonstrations, loss on completion tokens only.

One learning step (``SFT.learn``), for each mini-batch of ``batch_size`` rows, for each micro-batch:
log-probs with grad -> ``losses.sft_loss`` (NLL of the completion tokens) -> backward; then one clipped
optimizer step. The loss is the mean over the completion tokens of the whole optimizer batch, so gradient
accumulation over micro-batches gives the gradient of one big batch.

SFT keeps no reference adapter by default (nothing anchors it). Its checkpoint starts the next stage:
``DPO.load_checkpoint`` copies the SFT actor onto DPO's reference (SFT -> DPO -> GRPO).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.envs.sft import SFTGym, SupervisedBatch
from agilerl_llm.losses import sft_loss
from agilerl_llm.model.liger_triton import require_liger_cross_entropy


class SFT(LLMAlgorithm):
    """Supervised fine-tuning on a LoRA actor. Takes every argument of ``LLMAlgorithm``.

    ``use_separate_reference_adapter`` defaults to False here: SFT has no KL anchor. ``use_liger_loss=True``
    computes the token log-probs with liger-kernel's fused linear cross-entropy (a Triton kernel: GPUs, or
    ``TRITON_INTERPRET=1``; see ``model/liger_triton.py``).
    """

    # (held-out metric, sign): fitness = sign * metric, so higher fitness is better.
    fitness_metric: ClassVar[tuple[str, float]] = ("eval/loss", -1.0)

    def __init__(
        self,
        pad_token_id: int,
        pad_token: str,
        *,
        use_separate_reference_adapter: bool = False,
        use_liger_loss: bool = False,
        **kwargs: Any,
    ):
        self.use_liger_loss = use_liger_loss
        super().__init__(
            pad_token_id, pad_token, use_separate_reference_adapter=use_separate_reference_adapter, **kwargs
        )
        if use_liger_loss:
            require_liger_cross_entropy(self.device, "SFT")

    @property
    def uses_liger_cross_entropy(self) -> bool:
        return self.use_liger_loss

    def learn(self, experiences: SupervisedBatch) -> dict[str, float]:
        """One pass over ``experiences`` in optimizer steps of ``batch_size`` rows.

        Returns:
            ``loss/sft`` (mean NLL per completion token, averaged over steps; also as ``mean_loss``),
            ``grad_norm``, ``num_tokens`` and ``lr``.
        """
        if not isinstance(experiences, SupervisedBatch):
            raise ValueError(f"SFT.learn takes a SupervisedBatch (from SFTGym), got {type(experiences).__name__}.")
        self.set_training_mode(True)
        totals = {"loss": 0.0, "grad_norm": 0.0, "num_tokens": 0.0}
        steps = 0
        for start in range(0, experiences.num_rows, self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, experiences.num_rows))
            for key, value in self._optimise_mini_batch(experiences.select(rows)).items():
                totals[key] += value
            steps += 1
        loss = totals["loss"] / steps
        return {
            "loss/sft": loss,
            "mean_loss": loss,
            "grad_norm": totals["grad_norm"] / steps,
            "num_tokens": totals["num_tokens"],
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def _optimise_mini_batch(self, mini_batch: SupervisedBatch) -> dict[str, float]:
        num_tokens = self.dist.all_reduce_sum(mini_batch.loss_mask.sum().float().to(self.device))
        normalizer = num_tokens.clamp(min=1.0)
        total = 0.0
        for start in range(0, mini_batch.num_rows, self.micro_batch_size_per_gpu):
            micro = mini_batch.select(
                torch.arange(start, min(start + self.micro_batch_size_per_gpu, mini_batch.num_rows))
            )
            logprobs = self.get_logprobs(micro.input_ids, micro.attention_mask, requires_grad=True)
            loss = sft_loss(logprobs, micro.loss_mask.to(self.device), normalizer)
            self._backward(loss)
            total += float(loss.detach())
        total = self.dist.sum_floats({"loss": total})["loss"]  # shares of the global loss
        return {"loss": total, "grad_norm": self._optimizer_step(), "num_tokens": float(num_tokens)}

    @torch.no_grad()
    def evaluate(self, env: SFTGym) -> dict[str, float]:
        """Mean NLL per completion token over the whole held-out split (``eval/loss``) and its perplexity.

        Under several processes each rank scores its share and the sums are reduced: every rank gets the same.
        """
        self.set_training_mode(False)
        nll, tokens = 0.0, 0.0
        for batch, counted in env.sharded_test_batches():
            logprobs = self.get_logprobs(batch.input_ids, batch.attention_mask)
            mask = batch.loss_mask.to(self.device) & counted.to(self.device)[:, None]
            nll += float(sft_loss(logprobs, mask, 1.0))
            tokens += float(mask.sum())
        totals = self.dist.sum_floats({"nll": nll, "tokens": tokens})
        loss = totals["nll"] / max(totals["tokens"], 1.0)
        return {"eval/loss": loss, "eval/perplexity": float(torch.tensor(loss).exp())}

    def test(self, env: SFTGym, loop: int = 1) -> torch.Tensor:
        """The held-out loss as a 0-d tensor; ``-loss`` is appended to ``fitness`` (higher is better)."""
        loss = self.evaluate(env)["eval/loss"]
        self.fitness.append(-loss)
        return torch.tensor(loss)
