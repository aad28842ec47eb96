"""Supervised pairs for SFT: (prompt, completion) samples or chat conversations, tokenized with a loss mask.

A sample is either ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``.
Both are rendered with the tokenizer's chat template (an optional system prompt first). The loss mask marks
the tokens of every assistant message, the template's closing tokens included (e.g. ``<|eos|>``), so the
model learns to stop; the chat scaffolding before each assistant message is context only.

Tokenization is segment by segment: each render of ``messages[:k]`` must be a prefix of the render of
``messages[:k + 1]`` (true of ordinary chat templates), and each new segment is tokenized on its own, the
way an RL rollout sees the prompt and then the generated tokens.

``DatasetServer`` serves batches in a seeded random order (a fresh permutation per epoch) and the held-out
split in order; its position is in ``state_dict`` so a resumed run continues with the next batch. Under several
processes (``shard``) each rank serves its slice of every global batch and its share of the held-out split
(``envs/sharding.py``).

Notation: N rows, S tokens per row (right-padded), T = S - 1 next-token positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from agilerl_llm.envs.sharding import PADDING, ShardedData, held_out_shard, next_global_batch, rank_slice

Batch = TypeVar("Batch")
Message = dict[str, str]


@dataclass(frozen=True)
class SupervisedBatch:
    """Right-padded token rows with the positions whose next token is trained on.

    Attributes:
        input_ids: (N, S) token ids, right-padded.
        attention_mask: (N, S) bool, False on padding.
        loss_mask: (N, T) bool; position t is True when token t + 1 is a completion (assistant) token,
            aligned with ``LLMAlgorithm.get_logprobs``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> SupervisedBatch:
        """The rows picked by an index tensor."""
        return SupervisedBatch(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows])


def sample_messages(sample: dict[str, Any], system_prompt: str | None, index: int) -> list[Message]:
    """The conversation of one sample: its ``messages``, or ``prompt`` / ``completion`` as user / assistant."""
    if "messages" in sample:
        messages = list(sample["messages"])
    elif "prompt" in sample and "completion" in sample:
        messages = [
            {"role": "user", "content": str(sample["prompt"])},
            {"role": "assistant", "content": str(sample["completion"])},
        ]
    else:
        raise ValueError(
            f"sample {index} has keys {sorted(sample)}; an SFT sample needs 'messages' or 'prompt' and 'completion'."
        )
    if not any(message.get("role") == "assistant" for message in messages):
        raise ValueError(f"sample {index} has no assistant message, so nothing to train on.")
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def tokenize_conversation(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it belongs to an assistant message."""
    ids: list[int] = []
    trained: list[bool] = []
    rendered = ""

    def extend(text: str, is_completion: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise ValueError(
                "the chat template does not render conversations incrementally (a shorter conversation is not a "
                "prefix of a longer one); SFT needs a template whose renders extend each other."
            )
        new_ids = tokenizer(text[len(rendered) :], add_special_tokens=False)["input_ids"]
        ids.extend(new_ids)
        trained.extend([is_completion] * len(new_ids))
        rendered = text

    for k, message in enumerate(messages):
        if message.get("role") == "assistant":
            extend(tokenizer.apply_chat_template(list(messages[:k]), add_generation_prompt=True, tokenize=False), False)
        full = tokenizer.apply_chat_template(list(messages[: k + 1]), add_generation_prompt=False, tokenize=False)
        extend(full, message.get("role") == "assistant")
    return ids, trained


def collate_supervised(
    rows: Sequence[tuple[list[int], list[bool]]], pad_token_id: int, width: int | None = None
) -> SupervisedBatch:
    """Right-pad ``(ids, is_completion)`` rows into a ``SupervisedBatch`` of at least ``width`` tokens."""
    width = max([len(ids) for ids, _ in rows] + [width or 0])
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    trained = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (ids, flags) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = True
        trained[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return SupervisedBatch(input_ids, attention_mask, trained[:, 1:])


class DatasetServer(ShardedData, Generic[Batch]):
    """Serves rendered batches of a train split in a seeded random order and a test split in order.

    Args:
        train_dataset, test_dataset: sequences of samples (a ``datasets.Dataset`` or a list of dicts).
        render: turns a list of samples into a batch.
        data_batch_size_per_gpu: samples per batch (per process).
        seed: seeds the training order (a fresh permutation per epoch).
        accelerator: shard the data over its processes (``shard``); the finetune loops do this themselves.
    """

    def __init__(
        self,
        train_dataset: Sequence[dict[str, Any]],
        test_dataset: Sequence[dict[str, Any]],
        render: Callable[[list[dict[str, Any]]], Batch],
        data_batch_size_per_gpu: int,
        seed: int,
        accelerator: Any | None = None,
    ) -> None:
        if data_batch_size_per_gpu < 1:
            raise ValueError(f"data_batch_size_per_gpu must be >= 1, got {data_batch_size_per_gpu}.")
        for name, dataset in (("train_dataset", train_dataset), ("test_dataset", test_dataset)):
            if len(dataset) == 0:
                raise ValueError(f"{name} is empty.")
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.render = render
        self.data_batch_size_per_gpu = data_batch_size_per_gpu
        self.seed = seed
        self.epoch, self.cursor = 0, 0
        self.shard_for(accelerator)

    def reset(self, reset_dataloaders: bool = False) -> Batch:
        """The next training batch (from the start of the first epoch with ``reset_dataloaders``)."""
        if reset_dataloaders:
            self.epoch, self.cursor = 0, 0
        return self.advance()

    def advance(self) -> Batch:
        """The next training batch (this rank's slice of the global batch); epochs roll over seamlessly."""
        indices, self.epoch, self.cursor = next_global_batch(
            self.seed, self.epoch, self.cursor, len(self.train_dataset), self.data_batch_size_per_gpu * self.world_size
        )
        return self.render([self.train_dataset[i] for i in rank_slice(indices, self.rank, self.world_size)])

    def test_batches(self) -> Iterator[Batch]:
        """The whole held-out split, in order, in batches of ``data_batch_size_per_gpu`` (every rank: all of it)."""
        for start in range(0, len(self.test_dataset), self.data_batch_size_per_gpu):
            stop = min(start + self.data_batch_size_per_gpu, len(self.test_dataset))
            yield self.render([self.test_dataset[i] for i in range(start, stop)])

    def sharded_test_batches(self) -> Iterator[tuple[Batch, torch.Tensor]]:
        """This rank's share of the held-out split: ``(batch, counted)`` pairs, ``counted`` a (rows,) bool tensor
        that is False on padded rows. Every rank yields the same number of batches of the same sizes."""
        shard = held_out_shard(len(self.test_dataset), self.rank, self.world_size)
        for start in range(0, len(shard), self.data_batch_size_per_gpu):
            ids = shard[start : start + self.data_batch_size_per_gpu]
            batch = self.render([self.test_dataset[max(i, 0)] for i in ids])  # padding repeats sample 0
            yield batch, torch.tensor([i != PADDING for i in ids], dtype=torch.bool)

    @property
    def num_test_samples(self) -> int:
        return len(self.test_dataset)

    def state_dict(self) -> dict[str, int]:
        """The training position (plain ints)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position saved by ``state_dict``."""
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])


def check_tokenizer(tokenizer: Any) -> None:
    """The tokenizer needs a chat template and a pad token."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer has no chat_template; set tokenizer.chat_template before building the env.")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before building the env.")


class SFTGym(DatasetServer[SupervisedBatch]):
    """Supervised fine-tuning data: batches of rendered conversations with a completion-only loss mask.

    Args:
        train_dataset, test_dataset: samples ``{"prompt", "completion"}`` or ``{"messages"}`` (see module doc).
        tokenizer: a HuggingFace tokenizer with a chat template and a pad token.
        data_batch_size_per_gpu: samples per batch.
        system_prompt: a system message placed first in conversations that have none.
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
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        super().__init__(
            train_dataset, test_dataset, self.render_samples, data_batch_size_per_gpu, seed, accelerator=accelerator
        )
        self.render_samples([train_dataset[0]])  # fail here, not mid-run, on a malformed sample

    def render_samples(self, samples: list[dict[str, Any]]) -> SupervisedBatch:
        """Tokenize samples into one right-padded ``SupervisedBatch``."""
        rows = [
            tokenize_conversation(self.tokenizer, sample_messages(sample, self.system_prompt, index))
            for index, sample in enumerate(samples)
        ]
        return collate_supervised(rows, self.tokenizer.pad_token_id)
