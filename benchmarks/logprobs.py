"""Naive full-logits log-probs vs the fused chunked op: median wall time and peak extra memory, on CPU.

Usage::

    python benchmarks/logprobs.py            # full table, about 4 minutes on 2 cores
    python benchmarks/logprobs.py --quick    # tiny smoke run (used by tests/test_logprobs.py)

Every measurement runs in a fresh subprocess (``--worker JSON``), so one call's allocations cannot lower or raise
another's peak; naive and fused alternate, repeat by repeat, so load from other processes on a shared machine
lands on both. Inside the worker the inputs are allocated first, then: peak RSS is reset (``5`` -> /proc/self/clear_refs resets VmHWM), RSS is read, the call runs, and
``peak extra = VmHWM - RSS before``. glibc's mmap threshold is pinned at 128 KiB so every freed tensor goes back
to the OS instead of staying resident in the heap and hiding the next repeat's allocations.

Passes: ``forward`` runs under ``torch.no_grad()`` (how old/reference log-probs are computed); ``forward+backward``
runs ``logprobs.sum().backward()`` with grads for hidden and weight. Inputs are fp32, temperature 1, no bias,
``chunk_rows`` left to its default. Targets (checked on the large size): fused peak extra memory <= 1/8 of naive's
and fused time <= 1.1x naive's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere, without installing the package

import torch  # noqa: E402

from agilerl_llm.model.logprobs import auto_chunk_rows, fused_logprobs, naive_logprobs  # noqa: E402

NUM_THREADS = 2
MEMORY_TARGET = 1 / 8  # fused peak extra / naive peak extra
TIME_TARGET = 1.1  # fused time / naive time
# (rows N, hidden H, vocab V, full-size warm-up calls, repeats); the last entry is the headline size.
FULL_SIZES = [(2048, 512, 8192, 1, 3), (8192, 1024, 32768, 0, 3)]
QUICK_SIZES = [(256, 64, 512, 1, 1)]
PASSES = ["forward", "forward+backward"]
VARIANTS = {"naive": naive_logprobs, "fused": fused_logprobs}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _run_once(fn, hidden, weight, target_ids, with_backward: bool) -> None:
    if with_backward:
        fn(hidden, weight, target_ids).sum().backward()
        hidden.grad, weight.grad = None, None
    else:
        with torch.no_grad():
            fn(hidden, weight, target_ids)


def _measure(fn, hidden, weight, target_ids, with_backward: bool) -> tuple[float, float]:
    """One timed call: (wall ms, peak extra MiB over the RSS right before it)."""
    gc.collect()
    exact_peak = _reset_peak_rss()
    rss_before_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    _run_once(fn, hidden, weight, target_ids, with_backward)
    wall_ms = (time.perf_counter() - start) * 1e3
    # Without clear_refs the lifetime peak is the best available; inputs were allocated first, so it is close.
    peak_kib = _status_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return wall_ms, max(0, peak_kib - rss_before_kib) / 1024


def worker(cell: dict) -> dict:
    """Measure one call of one cell in this (fresh) process: {"ms": wall ms, "peak_mb": peak extra MiB}."""
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(0)
    fn, with_backward = VARIANTS[cell["variant"]], cell["pass"] == "forward+backward"
    rows, hidden_size, vocab = cell["rows"], cell["hidden"], cell["vocab"]

    # Warm the BLAS and thread pools on a tiny problem so their one-off buffers are not charged to the call.
    tiny = [torch.randn(8, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True), torch.zeros(8).long()]
    _run_once(fn, *tiny, with_backward)
    hidden = torch.randn(rows, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    target_ids = torch.randint(0, vocab, (rows,))
    hidden.requires_grad_(with_backward)
    weight.requires_grad_(with_backward)
    for _ in range(cell["warmup"]):
        _run_once(fn, hidden, weight, target_ids, with_backward)
    wall_ms, peak_mb = _measure(fn, hidden, weight, target_ids, with_backward)
    return {"ms": wall_ms, "peak_mb": peak_mb}


def _run_cell(cell: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(NUM_THREADS))
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cell)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker for {cell} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _footer(results: dict, sizes: list[tuple[int, int, int, int, int]], quick: bool) -> list[str]:
    """One line per (size, pass): the two ratios and whether each meets its target (judged on the headline size)."""
    lines = []
    for index, (rows, hidden_size, vocab, _, _) in enumerate(sizes):
        headline = not quick and index == len(sizes) - 1
        one_tile = auto_chunk_rows(vocab) >= rows
        for pass_name in PASSES:
            naive, fused = results[("naive", pass_name, rows)], results[("fused", pass_name, rows)]
            memory_ratio = fused["peak_mb"] / max(naive["peak_mb"], 1e-9)
            time_ratio = fused["ms"] / naive["ms"]
            memory_ok, time_ok = memory_ratio <= MEMORY_TARGET, time_ratio <= TIME_TARGET
            scope = "target" if headline else "info (smoke run, no target)" if quick else "info (not a target size)"
            note = "; one tile covers all rows at this size" if one_tile else ""
            lines.append(
                f"{scope}: N={rows} H={hidden_size} V={vocab} {pass_name}: "
                f"memory fused/naive = {memory_ratio:.3f} (<= {MEMORY_TARGET:.3f}: {'met' if memory_ok else 'NOT met'}), "
                f"time fused/naive = {time_ratio:.2f} (<= {TIME_TARGET}: {'met' if time_ok else 'NOT met'}){note}"
            )
    return lines


def main(quick: bool) -> None:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    header = (
        f"{'variant':<8}| {'pass':<17}| {'N':>6} | {'H':>5} | {'V':>6} | {'ms (median)':>11} | {'peak extra MB':>13}"
    )
    print(f"torch {torch.__version__}, {NUM_THREADS} threads, fp32, default chunk_rows (auto_chunk_rows(V))")
    print(header)
    print("-" * len(header), flush=True)
    results = {}
    for rows, hidden_size, vocab, warmup, repeats in sizes:
        for pass_name in PASSES:
            cell = {"pass": pass_name, "rows": rows, "hidden": hidden_size, "vocab": vocab, "warmup": warmup}
            # One process per measurement, naive and fused alternating, so a neighbour's load on a shared
            # machine hits both variants alike instead of biasing whichever ran during it.
            runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
            for _ in range(repeats):
                for variant in VARIANTS:
                    runs[variant].append(_run_cell({**cell, "variant": variant}))
            for variant, measurements in runs.items():
                # Peak memory is a max over repeats: the worst case is what has to fit.
                result = {
                    "ms": statistics.median(run["ms"] for run in measurements),
                    "peak_mb": max(run["peak_mb"] for run in measurements),
                }
                results[(variant, pass_name, rows)] = result
                print(
                    f"{variant:<8}| {pass_name:<17}| {rows:>6} | {hidden_size:>5} | {vocab:>6} | "
                    f"{result['ms']:>11.1f} | {result['peak_mb']:>13.1f}",
                    flush=True,
                )
    print("-" * len(header))
    print("\n".join(_footer(results, sizes, quick)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--worker", help="internal: measure one cell given as JSON and print the result as JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
    else:
        main(args.quick)
