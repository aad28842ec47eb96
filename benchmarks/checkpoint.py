"""Agent checkpoint cost per grid cell: save and load wall time and size on disk, on the ~30M-parameter tiny model.

Usage::

    python benchmarks/checkpoint.py            # the "30m" model, 3 repeats per cell (about a minute on 2 cores)
    python benchmarks/checkpoint.py --size nano --repeats 1    # smoke run

Setup: a GRPO agent (rank-16 LoRA on every linear layer, actor + reference adapters) takes one learning step so
its optimizer has state. Then for each (lora_only, save_optimizer) cell of the plain path: ``save_checkpoint``
into a fresh folder (the first save of a cell is not timed: it pays page-cache and allocator warm-up), the
folder's size, and ``load_checkpoint`` back into a second agent with ``load_optimizer=save_optimizer``. Times are
medians over the repeats. The DeepSpeed path is not timed here: it needs several processes and its cost is
dominated by the engine's own checkpoint format.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm import GRPO
from agilerl_llm.testing import count_parameters, save_tiny_model

CELLS = [(True, True), (True, False), (False, True), (False, False)]  # (lora_only, save_optimizer)


def make_agent(model_dir: Path, tokenizer, seed: int) -> GRPO:
    return GRPO(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
        group_size=4,
        batch_size=4,
        lr=1e-4,
        seed=seed,
        gradient_checkpointing=False,
    )


def one_learning_step(agent: GRPO) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 24), generator=generator)
    action_mask = torch.zeros(4, 23, dtype=torch.long)
    action_mask[:, 8:] = 1
    agent.learn((ids, action_mask, torch.rand(1, 4, generator=generator)))


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="30m", help="tiny model size (nano, tiny, small, 30m)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_dir = save_tiny_model(scratch / "model", args.size)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        source, target = make_agent(model_dir, tokenizer, seed=1), make_agent(model_dir, tokenizer, seed=2)
        one_learning_step(source)
        adapter_parameters = sum(p.numel() for p in source.adapters.parameters("actor"))
        print(
            f"model: {args.size}, {count_parameters(source.actor) - 2 * adapter_parameters:,} base parameters, "
            f"{adapter_parameters:,} per LoRA adapter (actor + reference); median of {args.repeats} repeats\n"
        )
        header = f"{'lora_only':>9} {'save_optimizer':>14} {'save (s)':>9} {'load (s)':>9} {'size (MB)':>10}"
        print(header)
        print("-" * len(header))
        for lora_only, save_optimizer in CELLS:
            path = scratch / "ckpt"
            source.save_checkpoint(path, lora_only=lora_only, save_optimizer=save_optimizer)  # warm-up
            saves, loads = [], []
            for _ in range(args.repeats):
                shutil.rmtree(path)
                start = time.perf_counter()
                source.save_checkpoint(path, lora_only=lora_only, save_optimizer=save_optimizer)
                saves.append(time.perf_counter() - start)
                start = time.perf_counter()
                target.load_checkpoint(path, load_optimizer=save_optimizer)
                loads.append(time.perf_counter() - start)
            size_mb = folder_size(path) / 1e6
            print(
                f"{str(lora_only):>9} {str(save_optimizer):>14} {statistics.median(saves):>9.3f} "
                f"{statistics.median(loads):>9.3f} {size_mb:>10.2f}"
            )
            shutil.rmtree(path)


if __name__ == "__main__":
    main()
