"""Resident memory and GRPO step time of an fp32 base vs a bitsandbytes-quantized base (QLoRA) on the CPU.

Usage::

    python benchmarks/qlora_memory.py                       # 30m model: fp32, nf4, int8 (~2-3 min)
    python benchmarks/qlora_memory.py --model-size nano --steps 1      # smoke run

Each variant runs in a FRESH subprocess (one thread), so no allocation of one stays in the next one's RSS. A
worker imports everything and records its RSS (the runtime baseline), builds a GRPO agent on the base, runs one
warm-up step and then ``--steps`` timed ``get_action`` + ``learn`` steps, and records:

* the base model's weight bytes (unique tensor storage of the frozen parameters and quantization buffers);
* after the steps and a ``malloc_trim``, minus the runtime baseline: ``VmRSS`` (every resident page) and ``RssAnon``
  (allocated memory only), and the peak ``ru_maxrss``. Read them together: an fp32 base is used in place from
  the memory-mapped safetensors file (file-backed pages: in VmRSS, not in RssAnon), while a quantized base
  allocates its packed weights (RssAnon) after reading every fp32 page of that file once (still counted in VmRSS
  and the peak, though the kernel may drop them). On an accelerator the saving is the weights column;
* the mean wall time of one step (generation + learning).

The lm_head (and embeddings) stay in full precision in every variant: the fused log-prob op needs the head
exact, so the quantized saving is the decoder's linear layers.
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
import time
from pathlib import Path

VARIANTS = ("fp32", "nf4", "int8")


def status_mb(field: str) -> float:
    """A memory figure from /proc/self/status: ``VmRSS`` (all resident pages) or ``RssAnon`` (allocated memory,
    without file-backed pages such as the memory-mapped safetensors file the loader reads)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(model_dir: str, variant: str, steps: int) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from agilerl_llm import GRPO

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    baseline = {field: status_mb(field) for field in ("VmRSS", "RssAnon")}
    quantization = {
        "fp32": None,
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }[variant]
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, model_name=model_dir, quantization_config=quantization,
                 group_size=4, batch_size=8, max_output_tokens=16, lr=1e-4, beta=0.0, gradient_checkpointing=False,
                 seed=0)  # fmt: skip
    seen, base_bytes = set(), 0
    for tensor in [*agent.actor.parameters(), *agent.actor.buffers()]:
        if tensor.requires_grad or tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        base_bytes += tensor.untyped_storage().nbytes()
    prompts = torch.randint(3, 200, (2, 32))
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}

    def step() -> None:
        result = agent.get_action(batch)
        agent.learn((result.completion_ids, result.action_masks, torch.rand(2, 4), result.attention_mask))

    step()  # warm-up: allocator pools and AdamW state exist before timing
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    # Loading a quantized base reads the fp32 weights first; glibc keeps the freed pages unless asked to return
    # them. Trimming (in every variant) makes RSS show what is live, not what the allocator holds on to.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {
        "base_mb": base_bytes / 2**20,
        "rss_mb": status_mb("VmRSS") - baseline["VmRSS"],
        "anon_mb": status_mb("RssAnon") - baseline["RssAnon"],
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="30m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, variant, steps = args.worker
        print(json.dumps(worker(model_dir, variant, int(steps))))
        return

    from agilerl_llm.testing import save_tiny_model

    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_tiny_model(Path(tmp) / "model", args.model_size))
        for variant in args.variants:
            command = [sys.executable, __file__, "--worker", model_dir, variant, str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            rows[variant] = json.loads(output.strip().splitlines()[-1])
    reference = rows.get("fp32")
    print(f"model {args.model_size}, one thread, {args.steps} timed GRPO steps (8 completions of 16 tokens)")
    print(
        f"{'base':<6}{'base weights MB':>17}{'VmRSS MB':>10}{'RssAnon MB':>12}{'peak MB':>9}{'step s':>9}{'weights vs fp32':>17}"
    )
    for variant, row in rows.items():
        ratio = f"{row['base_mb'] / reference['base_mb']:.2f}x" if reference else "-"
        print(f"{variant:<6}{row['base_mb']:>17.1f}{row['rss_mb']:>10.1f}{row['anon_mb']:>12.1f}{row['peak_mb']:>9.1f}{row['step_s']:>9.3f}"
              f"{ratio:>17}")  # fmt: skip


if __name__ == "__main__":
    main()
