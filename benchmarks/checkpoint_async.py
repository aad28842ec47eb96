"""How long a run checkpoint blocks the training loop, synchronous vs ``save_async=True``, on the "30m" tiny model.

Usage::

    python benchmarks/checkpoint_async.py                 # "30m", 4 timed saves per mode
    python benchmarks/checkpoint_async.py --size nano --saves 2     # smoke run

Setup: a GRPO agent (rank-16 LoRA on every linear layer, actor + reference adapters) and a ``CheckpointManager``
with ``interval=1, keep=2``. Each iteration takes one learning step (the "training" the writer overlaps with), then
calls ``manager.save`` and times how long that call blocks the loop. For async saving that is the snapshot (adapters,
optimizer and LR-schedule state copied to host memory, RNG, trainer state) plus any wait for the previous write still
in flight. Copies into the previous snapshot's host buffers are done by the writer thread, and the next optimizer
step waits for them if they are not done yet: that wait is counted in "fence wait" (it is part of the learning step,
so it shows in that column too). The first save of each mode is a warm-up and is not timed; ``close()`` at the end
(waiting for the last write) is reported separately. The target is async blocking <= 10% of sync.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm import GRPO
from agilerl_llm.checkpoint import CheckpointConfig, CheckpointManager
from agilerl_llm.testing import save_tiny_model
from agilerl_llm.utils import write_fence


def make_agent(model_dir: Path, tokenizer) -> GRPO:
    return GRPO(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
        group_size=4,
        batch_size=4,
        lr=1e-4,
        seed=1,
        gradient_checkpointing=False,
    )


def learning_step(agent: GRPO, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 200, (4, 24), generator=generator)
    action_mask = torch.zeros(4, 23, dtype=torch.long)
    action_mask[:, 8:] = 1
    agent.learn((ids, action_mask, torch.rand(1, 4, generator=generator)))


def measure(agent: GRPO, path: Path, save_async: bool, saves: int) -> dict[str, float]:
    manager = CheckpointManager(CheckpointConfig(path=path, interval=1, keep=2, resume="none", save_async=save_async))
    blocked, learn, fenced = [], [], []
    for step in range(saves + 1):
        waited = write_fence.waited_seconds
        started = time.perf_counter()
        learning_step(agent, step)
        learned = time.perf_counter()
        if step > 1:  # the wait, if any, for the copies of the save before this step
            fenced.append(write_fence.waited_seconds - waited)
        manager.save(step, [agent], None, samples_seen=step)
        saved = time.perf_counter()
        if step > 0:  # the first save pays page-cache and allocator warm-up
            blocked.append(saved - learned)
            learn.append(learned - started)
    started = time.perf_counter()
    manager.close()
    closed = time.perf_counter() - started
    assert manager.latest_step() == saves
    return {
        "blocked": statistics.median(blocked),
        "worst": max(blocked),
        "learn": statistics.median(learn),
        "fence": max(fenced, default=0.0),
        "close": closed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="30m", help="tiny model size (nano, tiny, small, 30m)")
    parser.add_argument("--saves", type=int, default=4, help="timed saves per mode")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_dir = save_tiny_model(scratch / "model", args.size)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        agent = make_agent(model_dir, tokenizer)
        adapter_parameters = sum(p.numel() for p in agent.adapters.parameters("actor"))
        print(
            f"model: {args.size}, {adapter_parameters:,} parameters per LoRA adapter (actor + reference, AdamW state); "
            f"median of {args.saves} saves, each after one learning step\n"
        )
        results = {mode: measure(agent, scratch / mode, mode == "async", args.saves) for mode in ("sync", "async")}
        header = (
            f"{'mode':>6} {'blocked/save (ms)':>18} {'worst (ms)':>11} {'learn step (ms)':>16} "
            f"{'worst fence wait (ms)':>22} {'close (ms)':>11}"
        )
        print(header)
        print("-" * len(header))
        for mode, r in results.items():
            print(
                f"{mode:>6} {1e3 * r['blocked']:>18.1f} {1e3 * r['worst']:>11.1f} {1e3 * r['learn']:>16.1f} "
                f"{1e3 * r['fence']:>22.2f} {1e3 * r['close']:>11.1f}"
            )
        ratio = results["async"]["blocked"] / results["sync"]["blocked"]
        print(f"\nasync blocks the loop {100 * ratio:.1f}% as long as sync per save (target <= 10%)")


if __name__ == "__main__":
    main()
