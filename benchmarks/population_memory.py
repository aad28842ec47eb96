"""Resident memory of a GRPO population on one shared base model vs one base copy per member.

Usage::

    python benchmarks/population_memory.py                 # 30m model, 1/2/4/8 shared, 1/2/4 naive (~1-2 min)
    python benchmarks/population_memory.py --model-size nano --sizes 1 2 --naive-sizes 1    # smoke run

Every measurement runs in a FRESH subprocess, so no allocation of one population stays in the next one's RSS.
A worker imports everything, records its RSS (the "runtime" baseline: Python, torch, transformers, PEFT),
then builds the population, runs one real ``learn`` step per member (so every member's AdamW state and
gradients exist) and records:

* ``VmRSS`` from /proc/self/status after the steps (after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so heap
  the steps freed is not counted as held), and the peak ``ru_maxrss``;
* the bytes of unique tensor storage (parameters, buffers, optimizer state), deduplicated by storage pointer
  and split into the frozen base parameters and the per-member part (LoRA adapters, optimizer state and the
  model's small buffers, e.g. rotary tables, which clones copy).

"shared" members come from ``create_population`` (member 0 loads the model, the others are clones over the
same base tensors); "naive" members each load their own base with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def vm_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def tensor_bytes(population) -> tuple[int, int]:
    """(base bytes, per-member bytes) of unique tensor storage across the population."""
    import torch

    seen: set[int] = set()
    base = per_member = 0

    def count(tensor: torch.Tensor, is_base: bool) -> None:
        nonlocal base, per_member
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        if is_base:
            base += storage.nbytes()
        else:
            per_member += storage.nbytes()

    for agent in population:
        for name, parameter in agent.actor.named_parameters():
            count(parameter, "lora_" not in name)
        for buffer in agent.actor.buffers():  # small constants (rotary tables); clones copy them
            count(buffer, False)
        for state in agent.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    count(value, False)
    return base, per_member


def worker(mode: str, members: int, model_dir: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agilerl_llm import GRPO, create_population

    torch.set_num_threads(2)
    runtime_mb = vm_rss_mb()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = dict(
        pad_token_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        group_size=4,
        batch_size=4,
        lr=1e-4,
        gradient_checkpointing=False,
    )
    if mode == "shared":
        population = create_population(
            GRPO, members, actor_network=AutoModelForCausalLM.from_pretrained(model_dir), **kwargs
        )
    else:
        population = [
            GRPO(index=i, actor_network=AutoModelForCausalLM.from_pretrained(model_dir), **kwargs)
            for i in range(members)
        ]
    generator = torch.Generator().manual_seed(0)
    for agent in population:
        ids = torch.randint(3, 200, (4, 24), generator=generator)
        action_mask = torch.zeros(4, 23, dtype=torch.long)
        action_mask[:, 8:] = 1
        agent.learn((ids, action_mask, torch.rand(1, 4, generator=generator)))
    base, per_member = tensor_bytes(population)
    # Freed heap (the learn steps' activations) back to the OS before reading RSS, so RSS counts what the
    # population holds rather than what glibc kept cached from the steps.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {
        "runtime_mb": runtime_mb,
        "rss_mb": vm_rss_mb(),
        "peak_mb": peak_rss_mb(),
        "base_tensor_mb": base / 2**20,
        "member_tensor_mb": per_member / 2**20,
    }


def measure(mode: str, members: int, model_dir: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--members", str(members), "--model-dir", str(model_dir)],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{mode} worker with {members} members failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="30m", help="tiny model size (nano, tiny, small, 30m)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="shared-base population sizes")
    parser.add_argument("--naive-sizes", type=int, nargs="*", default=[1, 2, 4], help="one-copy-per-member sizes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=("shared", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--members", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.members, str(args.model_dir))))
        return

    from agilerl_llm.testing import save_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = save_tiny_model(Path(scratch) / "model", args.model_size)
        shared = {n: measure("shared", n, model_dir) for n in args.sizes}
        naive = {n: measure("naive", n, model_dir) for n in args.naive_sizes}

    first = shared[min(shared)]
    print(
        f"GRPO population, {args.model_size} model, LoRA r16 (actor + reference), one learn step per member; "
        f"base tensors {first['base_tensor_mb']:.1f} MB, runtime (imports) RSS {first['runtime_mb']:.0f} MB\n"
    )
    header = (
        f"{'members':>7} | {'shared-base RSS MB':>18} | {'vs 1 member':>11} | {'naive RSS MB':>12} | "
        f"{'tensor MB':>9} | {'per-member MB':>13} | {'peak RSS MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for n, row in shared.items():
        naive_rss = f"{naive[n]['rss_mb']:.0f}" if n in naive else "-"
        tensors = row["base_tensor_mb"] + row["member_tensor_mb"]
        print(
            f"{n:>7} | {row['rss_mb']:>18.0f} | {row['rss_mb'] / first['rss_mb']:>10.2f}x | {naive_rss:>12} | "
            f"{tensors:>9.1f} | {row['member_tensor_mb'] / n:>13.1f} | {row['peak_mb']:>11.0f}"
        )
    for n in sorted(set(naive) - set(shared)):
        print(f"{n:>7} | {'-':>18} | {'-':>11} | {naive[n]['rss_mb']:>12.0f} | {'-':>9} | {'-':>13} | {'-':>11}")
    largest = max(shared)
    ratio = shared[largest]["rss_mb"] / first["rss_mb"]
    above = (shared[largest]["rss_mb"] - first["runtime_mb"]) / (first["rss_mb"] - first["runtime_mb"])
    print(
        f"\n{largest} members: {ratio:.2f}x of {min(shared)} member (target <= 1.25x: {'met' if ratio <= 1.25 else 'NOT met'})"
    )
    print(f"{largest} members above the runtime baseline: {above:.2f}x of {min(shared)} member")
    if args.json:
        args.json.write_text(json.dumps({"shared": shared, "naive": naive}, indent=2))


if __name__ == "__main__":
    main()
