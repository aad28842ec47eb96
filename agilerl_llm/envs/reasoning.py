"""A dataset-backed reasoning environment: prompts in, completions scored by a reward function.

Each sample is a dict with a question and an answer. The question is rendered with the tokenizer's chat
template (an optional system prompt first) and the batch is left-padded, ready for ``generate``. The
user's ``reward_fn(completion, answer, prompt) -> float`` scores every completion; a reward function
that raises or returns a non-finite value stops the run with an error naming the sample.

The training split is served in a seeded random order, a fresh permutation per epoch; the position in
that order is part of ``state_dict`` so a resumed run continues with exactly the next batch. The
held-out split is served in order inside ``eval_mode()``.

Under several processes (``shard``, done by the finetune loops) each rank serves its own slice of every global
batch and its own share of the held-out split (``envs/sharding.py``); a group of completions never leaves the
rank that sampled it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agilerl_llm.envs.sharding import ShardedData, held_out_shard, next_global_batch, rank_slice
from agilerl_llm.rollout.base import ActionResult

RewardFn = Callable[[str, Any, str], float]


class RewardFunctionError(ValueError):
    """The user's reward function raised or returned something that is not a finite number."""


@dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of rendered prompts.

    Attributes:
        input_ids: (B, P) token ids, left-padded.
        attention_mask: (B, P) bool, False on padding.
        texts: the rendered prompt strings (chat template applied).
        questions: the raw questions.
        answers: the reference answers, passed to the reward function.
        sample_ids: held-out batches: each row's index in the test split (``sharding.PADDING`` for a padded
            row that must not be counted); empty for training batches.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    texts: list[str]
    questions: list[str]
    answers: list[Any]
    sample_ids: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)


class ReasoningGym(ShardedData):
    """Serves prompt batches from a dataset and scores completions with ``reward_fn``.

    Args:
        train_dataset: a ``datasets.Dataset`` or a list of dicts with ``question_key`` / ``answer_key``.
        test_dataset: the held-out split used by ``eval_mode`` and ``agent.test``.
        tokenizer: a HuggingFace tokenizer with a chat template.
        reward_fn: ``reward_fn(completion, answer, prompt) -> float``.
        data_batch_size_per_gpu: prompts per batch.
        system_prompt: an optional system message placed before each question.
        seed: seeds the order in which training samples are served.
        question_key, answer_key: the sample fields to read.
        accelerator: shard the data over its processes (``shard``); the finetune loops do this themselves.
    """

    def __init__(
        self,
        train_dataset: Sequence[dict[str, Any]],
        test_dataset: Sequence[dict[str, Any]],
        tokenizer: Any,
        reward_fn: RewardFn,
        data_batch_size_per_gpu: int = 8,
        system_prompt: str | None = None,
        seed: int = 0,
        question_key: str = "question",
        answer_key: str = "answer",
        accelerator: Any | None = None,
    ) -> None:
        if data_batch_size_per_gpu < 1:
            raise ValueError(f"data_batch_size_per_gpu must be >= 1, got {data_batch_size_per_gpu}.")
        for name, dataset in (("train_dataset", train_dataset), ("test_dataset", test_dataset)):
            if len(dataset) == 0:
                raise ValueError(f"{name} is empty.")
            missing = {question_key, answer_key} - set(dataset[0])
            if missing:
                raise ValueError(f"{name} samples lack the field(s) {sorted(missing)}; set question_key/answer_key.")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer has no chat_template; set tokenizer.chat_template before building the env.")
        if not callable(reward_fn):
            raise ValueError("reward_fn must be callable as reward_fn(completion, answer, prompt) -> float.")
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.data_batch_size_per_gpu = data_batch_size_per_gpu
        self.system_prompt = system_prompt
        self.seed = seed
        self.question_key, self.answer_key = question_key, answer_key
        self.epoch, self.cursor = 0, 0  # position in the training order
        self._evaluating = False
        self._test_cursor = 0
        self._current: PromptBatch | None = None
        self.shard_for(accelerator)

    # ----------------------------------------------------------------------------------------- serving
    def reset(self, reset_dataloaders: bool = False) -> PromptBatch:
        """The next batch of prompts (the first held-out batch inside ``eval_mode``)."""
        if reset_dataloaders and not self._evaluating:
            self.epoch, self.cursor = 0, 0
        if self._evaluating:
            self._test_cursor = 0
        self._current = self._next_batch()
        return self._current

    def step(self, completions: ActionResult) -> tuple[PromptBatch | None, torch.Tensor]:
        """Score the completions of the current batch; returns (next batch, rewards (B, G)).

        In eval mode the next batch is None once the held-out split is exhausted.
        """
        if self._current is None:
            raise RuntimeError("Call env.reset() before env.step().")
        rewards = self.score(self._current, completions)
        return self.advance(), rewards

    def advance(self) -> PromptBatch | None:
        """Move to the next batch without scoring (several agents scored the current one with ``score``)."""
        self._current = self._next_batch()
        return self._current

    def score(self, prompts: PromptBatch, completions: ActionResult) -> torch.Tensor:
        """Rewards (B, G) of completions grouped G per prompt, rows in prompt order."""
        rows = completions.completion_ids.shape[0]
        if rows % len(prompts) != 0:
            raise ValueError(f"{rows} completions cannot be grouped evenly over {len(prompts)} prompts.")
        group_size = rows // len(prompts)
        rewards = torch.empty(rows, dtype=torch.float32)
        for row in range(rows):
            prompt_index = row // group_size
            text = self.tokenizer.decode(completions.completion_tokens(row), skip_special_tokens=True)
            rewards[row] = self._reward(text, prompts.answers[prompt_index], prompts.texts[prompt_index], row)
        return rewards.view(len(prompts), group_size)

    def _reward(self, completion: str, answer: Any, prompt: str, row: int) -> float:
        try:
            value = self.reward_fn(completion, answer, prompt)
        except Exception as error:
            raise RewardFunctionError(
                f"reward_fn raised {type(error).__name__}: {error} on sample {row} "
                f"(prompt={prompt!r}, completion={completion!r}, answer={answer!r})."
            ) from error
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise RewardFunctionError(
                f"reward_fn returned {value!r} for sample {row} (prompt={prompt!r}, completion={completion!r}); "
                "it must return a finite float."
            )
        return float(value)

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Serve the held-out split, in order, inside the block; the training position is untouched."""
        saved = (self._evaluating, self._current, self._test_cursor)
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating, self._current, self._test_cursor = saved

    def _next_batch(self) -> PromptBatch | None:
        if self._evaluating:
            shard = held_out_shard(len(self.test_dataset), self.rank, self.world_size)
            if self._test_cursor >= len(shard):
                return None
            ids = shard[self._test_cursor : self._test_cursor + self.data_batch_size_per_gpu]
            self._test_cursor += len(ids)
            batch = self.render([self.test_dataset[max(i, 0)] for i in ids])  # padding repeats sample 0
            return dataclasses.replace(batch, sample_ids=tuple(ids))
        indices, self.epoch, self.cursor = next_global_batch(
            self.seed, self.epoch, self.cursor, len(self.train_dataset), self.data_batch_size_per_gpu * self.world_size
        )
        return self.render([self.train_dataset[i] for i in rank_slice(indices, self.rank, self.world_size)])

    def render(self, samples: Sequence[dict[str, Any]]) -> PromptBatch:
        """Apply the chat template to samples and tokenize them as one left-padded batch."""
        questions = [str(self._field(sample, self.question_key)) for sample in samples]
        texts = [
            self.tokenizer.apply_chat_template(self._messages(q), add_generation_prompt=True, tokenize=False)
            for q in questions
        ]
        encoded = self.tokenizer(
            texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
        )
        return PromptBatch(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"].bool(),
            texts=texts,
            questions=questions,
            answers=[self._field(sample, self.answer_key) for sample in samples],
        )

    def _field(self, sample: Any, key: str) -> Any:
        """``sample[key]``, or an error naming the field and the row (datasets are checked on their first row
        only; a later row can still lack a field)."""
        try:
            return sample[key]
        except (KeyError, TypeError, IndexError):
            raise ValueError(
                f"a dataset row lacks the field {key!r}: {str(sample)[:200]}. Every row needs "
                f"{self.question_key!r} and {self.answer_key!r} (set question_key / answer_key, or fix the row)."
            ) from None

    def _messages(self, question: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": question}]

    # ----------------------------------------------------------------------------------------- state
    @property
    def num_test_samples(self) -> int:
        return len(self.test_dataset)

    def state_dict(self) -> dict[str, int]:
        """The training position (plain ints), enough to serve exactly the next batch after a restore."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position saved by ``state_dict``."""
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
