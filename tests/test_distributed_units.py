"""The single-process pieces of multi-process training: batch statistics over split batches, data sharding, the
launch checks and the DeepSpeed config rules. (The multi-process runs are in test_distributed_training.py.)"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from agilerl_llm.advantages import compute_grpo_token_advantages, return_batch_normalisation, whiten_token_advantages
from agilerl_llm.distributed import Distributed, check_launch, launched_world_size
from agilerl_llm.envs.sharding import PADDING, held_out_shard, next_global_batch, rank_slice, training_order


class ThreadSum:
    """``batch_sum`` for ``ranks`` threads that each hold part of a batch: every call waits for all of them and
    returns the sum of what they passed, as an all-reduce across processes would."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks)
        self.lock = threading.Lock()
        self.values: list[torch.Tensor] = []
        self.total: torch.Tensor | None = None

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.values.append(value.detach().clone())
        if self.barrier.wait() == 0:
            self.total = torch.stack(self.values).sum(dim=0)
            self.values = []
        self.barrier.wait()
        return self.total.clone()


def run_split(function, shards: list[tuple]) -> list[torch.Tensor]:
    """``function(*shard, batch_sum=...)`` on each shard in its own thread, with one shared ThreadSum."""
    reducer, results = ThreadSum(len(shards)), [None] * len(shards)

    def work(index: int) -> None:
        results[index] = function(*shards[index], batch_sum=reducer)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_whitening_a_batch_split_over_ranks_equals_whitening_it_whole():
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2 + 1
    mask = torch.rand(6, 5, generator=generator) > 0.3
    whole = whiten_token_advantages(advantages, mask)
    parts = run_split(whiten_token_advantages, [(advantages[:2], mask[:2]), (advantages[2:], mask[2:])])
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)
    # and the local statistics alone would not give it
    assert not torch.allclose(torch.cat([whiten_token_advantages(advantages[:2], mask[:2]),
                                         whiten_token_advantages(advantages[2:], mask[2:])]), whole)  # fmt: skip


def test_return_batch_normalisation_over_split_batches_equals_the_whole_batch():
    returns = torch.tensor([0.0, 1.0, 10.0, 11.0, 3.0, -2.0], dtype=torch.float64)
    whole = return_batch_normalisation(returns)
    parts = run_split(return_batch_normalisation, [(returns[:3], 1e-6), (returns[3:], 1e-6)])
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)


def test_grpo_advantages_keep_groups_on_their_rank_and_whiten_globally():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.1, 0.3, 0.3], dtype=torch.float64)  # 4 groups of 2
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[1, 2] = mask[6, 0] = False
    whole = compute_grpo_token_advantages(rewards, mask, 2, whiten=True)

    def advantages(rows, row_mask, batch_sum):
        return compute_grpo_token_advantages(rows, row_mask, 2, whiten=True, batch_sum=batch_sum)

    parts = run_split(advantages, [(rewards[:4], mask[:4]), (rewards[4:], mask[4:])])
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)


def test_global_batches_are_cut_into_disjoint_rank_slices_of_the_one_order():
    indices, epoch, cursor = next_global_batch(seed=3, epoch=0, cursor=0, num_samples=10, size=8)
    assert indices == [int(i) for i in training_order(3, 0, 10)[:8]] and (epoch, cursor) == (0, 8)
    slices = [rank_slice(indices, rank, 2) for rank in range(2)]
    assert slices[0] + slices[1] == indices and not set(slices[0]) & set(slices[1])
    # rolling over an epoch: the rest of epoch 0, then the start of epoch 1
    more, epoch, cursor = next_global_batch(3, epoch, cursor, 10, 4)
    assert more == [int(i) for i in training_order(3, 0, 10)[8:]] + [int(i) for i in training_order(3, 1, 10)[:2]]
    assert (epoch, cursor) == (1, 2)


@pytest.mark.parametrize(("num_samples", "world_size"), [(5, 2), (6, 2), (7, 3), (1, 2)])
def test_held_out_shards_cover_the_split_once_with_equal_lengths(num_samples, world_size):
    shards = [held_out_shard(num_samples, rank, world_size) for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1
    real = sorted(i for shard in shards for i in shard if i != PADDING)
    assert real == list(range(num_samples))


def test_envs_shard_their_batches(tokenizer):
    from agilerl_llm import ReasoningGym

    data = [{"question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(12)]
    one = ReasoningGym(data, data[:5], tokenizer, lambda c, a, p: 0.0, data_batch_size_per_gpu=4, seed=2)
    ranks = [ReasoningGym(data, data[:5], tokenizer, lambda c, a, p: 0.0, data_batch_size_per_gpu=2, seed=2)
             for _ in range(2)]  # fmt: skip
    for rank, env in enumerate(ranks):
        env.shard(rank, 2)
    for _ in range(4):  # across an epoch boundary: 12 samples, 4 per step
        whole = one.advance().questions
        assert ranks[0].advance().questions + ranks[1].advance().questions == whole
    assert one.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()  # one global position
    with ranks[1].eval_mode():
        batch = ranks[1].reset()
        assert batch.sample_ids == (1, 3) and batch.questions == ["1+1=", "3+3="]
        batch = ranks[1].advance()
        assert batch.sample_ids == (PADDING,)  # 5 samples over 2 ranks: rank 1's third slot is padding
        assert ranks[1].advance() is None
    with pytest.raises(ValueError, match="rank must be in"):
        one.shard(2, 2)


def test_a_launch_this_process_cannot_see_is_refused(monkeypatch, tiny_model_dir, tokenizer):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_world_size() == 2
    with pytest.raises(RuntimeError, match="one of 2 started by the launcher.*make_accelerator"):
        check_launch(None)
    from helpers import tiny_grpo

    with pytest.raises(RuntimeError, match="no accelerator was given"):
        tiny_grpo(tiny_model_dir, tokenizer)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(None)


def deepspeed_distributed(config: dict) -> Distributed:
    dist = Distributed(None)
    dist.deepspeed_plugin = SimpleNamespace(deepspeed_config=config)
    return dist


def test_deepspeed_config_auto_values_are_filled_from_the_agent():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}  # fmt: skip
    deepspeed_distributed(config)._fill_deepspeed_config(micro_batch_size=4, max_grad_norm=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 0.5
    assert config["managed_gradient_accumulation"] is False and config["train_batch_size"] == 4


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gradient_clipping": 1.0}, "gradient_clipping=1.0 but the agent's max_grad_norm is 0.5"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
        ({"managed_gradient_accumulation": True}, "managed_gradient_accumulation=true"),
    ],
)
def test_deepspeed_config_values_that_contradict_the_agent_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_distributed(config)._fill_deepspeed_config(micro_batch_size=2, max_grad_norm=0.5)


def test_a_single_process_reduces_to_itself():
    dist = Distributed(None)
    assert (dist.rank, dist.world_size, dist.is_main, dist.backend) == (0, 1, True, "single")
    assert dist.sum_floats({"a": 1.5}) == {"a": 1.5} and dist.max_int(3) == 3
    tensor = torch.arange(3.0)
    assert torch.equal(dist.gather_rows(tensor), tensor) and dist.gather_objects("x") == ["x"]
