"""Preference pairs for DPO: a prompt with a chosen and a rejected completion.

A sample is ``{"prompt": str, "chosen": str, "rejected": str}`` (from a ``datasets.Dataset`` or a list of
dicts). The prompt is rendered with the chat template as a user message (an optional system prompt first);
each completion is the assistant's answer, the template's closing tokens included. Both rows of a pair share
the prompt tokens; only the completion tokens enter the sequence log-probs.

Batches are ``PreferenceBatch``: the chosen and rejected rows padded to one common width, pair i being row i
of both, so a learner can stack them into one forward pass.

Notation: B pairs, S tokens per row (right-padded), T = S - 1 next-token positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agilerl_llm.envs.sft import (
    DatasetServer,
    SupervisedBatch,
    check_tokenizer,
    collate_supervised,
    tokenize_conversation,
)

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceBatch:
    """B preference pairs: ``chosen`` and ``rejected`` are ``SupervisedBatch``es of the same (B, S) shape."""

    chosen: SupervisedBatch
    rejected: SupervisedBatch

    @property
    def num_pairs(self) -> int:
        return self.chosen.num_rows

    def select(self, pairs: torch.Tensor) -> PreferenceBatch:
        """The pairs picked by an index tensor."""
        return PreferenceBatch(self.chosen.select(pairs), self.rejected.select(pairs))

    def stacked(self) -> SupervisedBatch:
        """Chosen rows then rejected rows, (2B, S): one forward pass for both."""
        return SupervisedBatch(
            torch.cat([self.chosen.input_ids, self.rejected.input_ids]),
            torch.cat([self.chosen.attention_mask, self.rejected.attention_mask]),
            torch.cat([self.chosen.loss_mask, self.rejected.loss_mask]),
        )


class PreferenceGym(DatasetServer[PreferenceBatch]):
    """Serves batches of tokenized preference pairs.

    Args:
        train_dataset, test_dataset: samples with ``prompt``, ``chosen`` and ``rejected`` strings.
        tokenizer: a HuggingFace tokenizer with a chat template and a pad token.
        data_batch_size_per_gpu: pairs per batch.
        system_prompt: an optional system message placed before each prompt.
        seed: seeds the training order.
        accelerator: shard the data over its processes (``shard``); the finetune loops do this themselves.
    """

    def __init__(
        self,
        train_dataset: Sequence[dict[str, Any]],
        test_dataset: Sequence[dict[str, Any]],
        tokenizer: Any,
        data_batch_size_per_gpu: int = 8,
        system_prompt: str | None = None,
        seed: int = 0,
        accelerator: Any | None = None,
    ) -> None:
        check_tokenizer(tokenizer)
        for name, dataset in (("train_dataset", train_dataset), ("test_dataset", test_dataset)):
            if len(dataset) and (missing := set(PREFERENCE_KEYS) - set(dataset[0])):
                raise ValueError(f"{name} samples lack the field(s) {sorted(missing)}; need {list(PREFERENCE_KEYS)}.")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        super().__init__(
            train_dataset, test_dataset, self.render_samples, data_batch_size_per_gpu, seed, accelerator=accelerator
        )

    def render_samples(self, samples: list[dict[str, Any]]) -> PreferenceBatch:
        """Tokenize pairs into one ``PreferenceBatch`` (chosen and rejected padded to the same width)."""
        chosen, rejected = [], []
        for sample in samples:
            prompt = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            prompt.append({"role": "user", "content": str(sample["prompt"])})
            for key, rows in (("chosen", chosen), ("rejected", rejected)):
                answer = {"role": "assistant", "content": str(sample[key])}
                rows.append(tokenize_conversation(self.tokenizer, [*prompt, answer]))
        width = max(len(ids) for ids, _ in chosen + rejected)
        pad = self.tokenizer.pad_token_id
        return PreferenceBatch(collate_supervised(chosen, pad, width), collate_supervised(rejected, pad, width))
