"""Naive full-logits log-probs vs the fused chunked op: median wall time and peak extra memory, on CPU.

Usage::

    python benchmarks/logprobs.py            # full table, about 4 minutes on 2 idle cores
    python benchmarks/logprobs.py --quick    # tiny smoke run (used by tests/test_logprobs.py)

Every measurement runs in a fresh subprocess (``--worker JSON``), so one call's allocations cannot lower or raise
another's peak; naive and fused alternate, repeat by repeat, so load from other processes on a shared machine
lands on both. Inside the worker the inputs are allocated first, then: peak RSS is reset (``5`` ->
/proc/self/clear_refs resets VmHWM), RSS is read, the call runs, and ``peak extra = VmHWM - RSS before``.
glibc's mmap threshold is pinned at 128 KiB so every freed tensor goes back to the OS instead of staying
resident in the heap and hiding the next allocation. The timed call is the first full-size call in its process
(after a tiny warm-up of the thread pools) for the headline size, so both variants pay their page faults.

Passes: ``forward`` runs under ``torch.no_grad()`` (how old/reference log-probs are computed); ``forward+backward``
runs ``logprobs.sum().backward()`` with grads for hidden and weight; ``frozen-head f+b`` the same with a frozen
weight (the LoRA case: only hidden gets a grad; reported, not judged). Inputs are fp32, temperature 1, no bias,
``chunk_rows`` left to its default. Targets (checked on the large size): fused peak extra memory <= 1/8 of naive's
and fused time <= 1.1x naive's.

The parent process never imports torch (only the workers do), and ``--quick`` runs its workers side by side, so
the smoke run costs about one torch import of wall time; its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_THREADS = 2
MEMORY_TARGET = 1 / 8  # fused peak extra / naive peak extra
TIME_TARGET = 1.1  # fused time / naive time
# (rows N, hidden H, vocab V, full-size warm-up calls, repeats); the last entry is the headline size.
FULL_SIZES = [(2048, 512, 8192, 1, 3), (8192, 1024, 32768, 0, 3)]
QUICK_SIZES = [(256, 64, 512, 1, 1)]
PASSES = ["forward", "forward+backward", "frozen-head f+b"]
TARGET_PASSES = {"forward", "forward+backward"}  # the frozen-head pass (the LoRA case) is reported, not judged
VARIANTS = ["naive", "fused"]


def _load_logprobs_module():
    """Load agilerl_llm/model/logprobs.py by path: it needs only torch, while importing the package pulls in
    transformers and the rest (~4 s per worker process). Works from anywhere, without installing the package."""
    path = REPO_ROOT / "agilerl_llm" / "model" / "logprobs.py"
    spec = importlib.util.spec_from_file_location("_agilerl_llm_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    import torch

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
    """Measure one call of one cell in this (fresh) process: wall ms, peak extra MiB, and the run's settings."""
    import torch

    logprobs = _load_logprobs_module()
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(0)
    fn = {"naive": logprobs.naive_logprobs, "fused": logprobs.fused_logprobs}[cell["variant"]]
    with_backward = cell["pass"] != "forward"
    rows, hidden_size, vocab = cell["rows"], cell["hidden"], cell["vocab"]

    # Warm the BLAS and thread pools on a tiny problem so their one-off buffers are not charged to the call.
    tiny = [torch.randn(8, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True), torch.zeros(8).long()]
    _run_once(fn, *tiny, with_backward)
    hidden = torch.randn(rows, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    target_ids = torch.randint(0, vocab, (rows,))
    hidden.requires_grad_(with_backward)
    weight.requires_grad_(cell["pass"] == "forward+backward")
    for _ in range(cell["warmup"]):
        _run_once(fn, hidden, weight, target_ids, with_backward)
    wall_ms, peak_mb = _measure(fn, hidden, weight, target_ids, with_backward)
    return {
        "ms": wall_ms,
        "peak_mb": peak_mb,
        "torch": torch.__version__,
        "chunk_rows": logprobs.auto_chunk_rows(vocab),
    }


def _start_cell(cell: dict) -> subprocess.Popen:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(NUM_THREADS))
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(cell)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish_cell(cell: dict, process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"worker for {cell} failed:\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def _footer(results: dict, sizes: list[tuple[int, int, int, int, int]], quick: bool) -> list[str]:
    """One line per (size, pass): the two ratios and whether each meets its target (judged on the headline size)."""
    lines = []
    for index, (rows, hidden_size, vocab, _, _) in enumerate(sizes):
        for pass_name in PASSES:
            headline = not quick and index == len(sizes) - 1 and pass_name in TARGET_PASSES
            naive, fused = results[("naive", pass_name, rows)], results[("fused", pass_name, rows)]
            memory_ratio = fused["peak_mb"] / max(naive["peak_mb"], 1e-9)
            time_ratio = fused["ms"] / naive["ms"]
            min_ratio = fused["ms_min"] / naive["ms_min"]
            memory_ok, time_ok = memory_ratio <= MEMORY_TARGET, time_ratio <= TIME_TARGET
            scope = "target" if headline else "info (smoke run, no target)" if quick else "info (not a target)"
            note = "; one tile covers all rows at this size" if fused["chunk_rows"] >= rows else ""
            lines.append(
                f"{scope}: N={rows} H={hidden_size} V={vocab} {pass_name}: "
                f"memory fused/naive = {memory_ratio:.3f} (<= {MEMORY_TARGET:.3f}: {'met' if memory_ok else 'NOT met'}), "
                f"time fused/naive = {time_ratio:.2f} (<= {TIME_TARGET}: {'met' if time_ok else 'NOT met'}; "
                f"by min {min_ratio:.2f}){note}"
            )
    return lines


def _row(variant: str, pass_name: str, rows: int, hidden_size: int, vocab: int, result: dict) -> str:
    return (
        f"{variant:<8}| {pass_name:<17}| {rows:>6} | {hidden_size:>5} | {vocab:>6} | {result['ms']:>11.1f} | "
        f"{result['ms_min']:>8.1f} | {result['peak_mb']:>13.1f}"
    )


def main(quick: bool) -> None:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    cells = []  # (key, cell) in run order: per size and pass, naive and fused alternating, repeat by repeat
    for rows, hidden_size, vocab, warmup, repeats in sizes:
        for pass_name in PASSES:
            cell = {"pass": pass_name, "rows": rows, "hidden": hidden_size, "vocab": vocab, "warmup": warmup}
            for _ in range(repeats):
                cells += [((variant, pass_name, rows), {**cell, "variant": variant}) for variant in VARIANTS]

    load_before = os.getloadavg()[0]
    header = f"{'variant':<8}| {'pass':<17}| {'N':>6} | {'H':>5} | {'V':>6} | {'ms (median)':>11} | {'ms (min)':>8} | {'peak extra MB':>13}"
    print(f"{NUM_THREADS} threads, fp32, default chunk_rows (auto_chunk_rows(V)); 1-min load average {load_before:.1f}")
    print(header)
    print("-" * len(header), flush=True)
    if quick:  # a smoke run: start every worker at once, so it costs about one torch import of wall time
        started = [(key, cell, _start_cell(cell)) for key, cell in cells]
        measured = [(key, _finish_cell(cell, process)) for key, cell, process in started]
    else:  # one at a time: a measurement must not share the cores with another
        measured = []
        for index, (key, cell) in enumerate(cells, start=1):
            measured.append((key, run := _finish_cell(cell, _start_cell(cell))))
            progress = f"[{index}/{len(cells)}] {' '.join(map(str, key))}: {run['ms']:.0f} ms, {run['peak_mb']:.0f} MB"
            print(progress, file=sys.stderr, flush=True)

    runs: dict[tuple, list[dict]] = {}
    for key, run in measured:
        runs.setdefault(key, []).append(run)
    results = {}
    for (variant, pass_name, rows), key_runs in runs.items():
        # Peak memory is a max over repeats: the worst case is what has to fit.
        results[(variant, pass_name, rows)] = {
            "ms": statistics.median(run["ms"] for run in key_runs),
            "ms_min": min(run["ms"] for run in key_runs),
            "peak_mb": max(run["peak_mb"] for run in key_runs),
            "chunk_rows": key_runs[0]["chunk_rows"],
        }
    for rows, hidden_size, vocab, _, _ in sizes:
        for pass_name in PASSES:
            for variant in VARIANTS:
                result = results[(variant, pass_name, rows)]
                print(_row(variant, pass_name, rows, hidden_size, vocab, result))
    print("-" * len(header))
    print("\n".join(_footer(results, sizes, quick)))
    torch_version = measured[0][1]["torch"]
    print(f"torch {torch_version}; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--worker", help="internal: measure one cell given as JSON and print the result as JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
    else:
        main(args.quick)
