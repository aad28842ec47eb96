"""Per-iteration time and tokens/s of GRPO and SFT at 1 and 2 processes (data parallel), printed as a table.

Usage::

    python benchmarks/distributed_step.py                  # the 30M model, 2 warm-up + 6 measured iterations
    python benchmarks/distributed_step.py --size tiny --iterations 10
    python benchmarks/distributed_step.py --quick          # smoke run (nano model, 1 + 2 iterations)
    python benchmarks/distributed_step.py --backend zero2  # DeepSpeed ZeRO-2 for the 2-process rows

Weak scaling, as data-parallel jobs run: every process keeps the same per-rank batch, so 2 processes train twice
the rows of 1 per iteration. With perfect scaling s/iter stays flat and tokens/s doubles.

* GRPO: ``prompts`` prompts x ``group_size`` completions x exactly ``new_tokens`` new tokens per rank
  (``min_output_tokens = max_output_tokens``): ``get_action`` -> ``env.step`` -> ``learn``, one optimizer step;
* SFT: ``rows`` sequences of ``new_tokens`` trained tokens per rank: ``learn``, one optimizer step.

Reported (medians over the measured iterations; the 2-process time is rank 0's, every rank steps together):
s/iter, tokens/iter (trained tokens, all ranks) and tokens/s = tokens/iter / s/iter. One process is started
plainly; two under ``torch.distributed.run`` on this machine (CPU processes over gloo when there is no GPU). On a
2-core CPU machine each process gets one thread (``--threads``). GPU figures come from a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL = {"size": "30m", "prompts": 4, "group_size": 4, "rows": 16, "new_tokens": 16, "warmup": 2, "iterations": 6}
QUICK = {"size": "nano", "prompts": 2, "group_size": 2, "rows": 4, "new_tokens": 4, "warmup": 1, "iterations": 2}


def worker(config: dict) -> None:
    """One process of a measurement: trains GRPO and SFT, rank 0 writes the medians to ``config["out"]``."""
    import torch

    torch.set_num_threads(config["threads"])
    sys.path.insert(0, str(REPO_ROOT))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agilerl_llm import GRPO, SFT, ReasoningGym, SFTGym, make_accelerator
    from agilerl_llm.distributed import launched_world_size

    accelerator = None
    if launched_world_size() > 1:
        plugin = None
        if config["backend"].startswith("zero"):
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin(zero_stage=int(config["backend"][-1]))
        accelerator = make_accelerator(deepspeed_plugin=plugin)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    common = {"lr": 1e-5, "max_grad_norm": 1.0, "gradient_checkpointing": False, "seed": 0,
              "accelerator": accelerator, "device": device}  # fmt: skip
    data = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 100, 7) for b in range(10, 100, 5)]
    completion = "abcdefghijklmnopqrstuvwxyz"[: config["new_tokens"] - 1]  # + the template's eos
    rows = config["prompts"] * config["group_size"]
    grpo = GRPO(tokenizer.pad_token_id, tokenizer.pad_token,
                actor_network=AutoModelForCausalLM.from_pretrained(config["model_dir"]), group_size=config["group_size"],
                batch_size=rows, beta=0.001, max_output_tokens=config["new_tokens"],
                min_output_tokens=config["new_tokens"], **common)  # fmt: skip
    env = ReasoningGym(data, data[:4], tokenizer, lambda c, a, p: sum(ch.isdigit() for ch in c) / max(len(c), 1),
                       data_batch_size_per_gpu=config["prompts"], accelerator=accelerator)  # fmt: skip
    sft = SFT(tokenizer.pad_token_id, tokenizer.pad_token,
              actor_network=AutoModelForCausalLM.from_pretrained(config["model_dir"]), batch_size=config["rows"],
              **common)  # fmt: skip
    sft_data = [{"prompt": q["question"], "completion": completion} for q in data]
    sft_env = SFTGym(sft_data, sft_data[:4], tokenizer, data_batch_size_per_gpu=config["rows"], accelerator=accelerator)
    world = grpo.dist.world_size

    def grpo_step(prompts):
        result = grpo.get_action(prompts)
        next_prompts, rewards = env.step(result)
        grpo.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
        return int(result.action_masks.sum()), next_prompts

    timings: dict[str, list[tuple[float, int]]] = {"GRPO": [], "SFT": []}
    prompts, batch = env.reset(reset_dataloaders=True), sft_env.reset(reset_dataloaders=True)
    for iteration in range(config["warmup"] + config["iterations"]):
        grpo.dist.barrier()
        start = time.perf_counter()
        tokens, prompts = grpo_step(prompts)
        grpo.dist.barrier()
        grpo_seconds = time.perf_counter() - start
        start = time.perf_counter()
        sft.learn(batch)
        sft.dist.barrier()
        sft_seconds = time.perf_counter() - start
        sft_tokens = int(batch.loss_mask.sum())
        batch = sft_env.advance()
        if iteration >= config["warmup"]:
            timings["GRPO"].append((grpo_seconds, tokens))
            timings["SFT"].append((sft_seconds, sft_tokens))
    summary = {}
    for name, rows_measured in timings.items():
        seconds = statistics.median(s for s, _ in rows_measured)
        tokens = grpo.dist.sum_floats({"t": float(statistics.median(t for _, t in rows_measured))})["t"]
        summary[name] = {"s_per_iter": seconds, "tokens_per_iter": tokens, "tokens_per_s": tokens / seconds}
    if grpo.dist.is_main:
        Path(config["out"]).write_text(json.dumps({"world_size": world, "device": device, "results": summary}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(config: dict, processes: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(config["threads"]), "TOKENIZERS_PARALLELISM": "false",
                        "TRANSFORMERS_VERBOSITY": "error", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    payload = json.dumps(config | {"out": str(Path(config["tmp"]) / f"p{processes}.json")})
    command = [sys.executable, __file__, "--worker", payload]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"the {processes}-process run failed:\n{finished.stderr[-4000:]}")
    return json.loads(Path(json.loads(payload)["out"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on the nano model")
    parser.add_argument("--size", help="tiny model size (nano | tiny | small | 30m)")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--backend", default="ddp", choices=("ddp", "zero2", "zero3"), help="for the 2-process rows")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    config = dict(QUICK if args.quick else FULL) | {"threads": args.threads, "backend": args.backend}
    for key in ("size", "iterations", "warmup"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(REPO_ROOT))
        from agilerl_llm.testing import save_tiny_model

        model_dir = save_tiny_model(Path(tmp) / "model", config["size"], architecture="qwen2", seed=0)
        config |= {"model_dir": str(model_dir), "tmp": tmp}
        import torch

        # two processes need two GPUs (NCCL refuses two ranks on one device); a CPU machine runs them over gloo
        counts = (1, 2) if not torch.cuda.is_available() or torch.cuda.device_count() >= 2 else (1,)
        results = {processes: measure(config, processes) for processes in counts}
        if counts == (1,):
            print("one GPU on this machine: the 2-process rows need two")
    device = results[1]["device"]
    print(f"\n{config['size']} model, {device}, {config['threads']} thread(s)/process, 2-process backend "
          f"{config['backend']}; per rank: GRPO {config['prompts']}x{config['group_size']} completions of "
          f"{config['new_tokens']} tokens, SFT {config['rows']} rows of {config['new_tokens']} tokens")  # fmt: skip
    print(f"{'algorithm':<10}| {'processes':>9} | {'s/iter':>8} | {'tokens/iter':>11} | {'tokens/s':>9} | scaling")
    table = {}
    for name in ("GRPO", "SFT"):
        base = results[1]["results"][name]["tokens_per_s"]
        for processes in sorted(results):
            row = results[processes]["results"][name]
            scaling = row["tokens_per_s"] / base
            print(f"{name:<10}| {processes:>9} | {row['s_per_iter']:>8.3f} | {row['tokens_per_iter']:>11.0f} | "
                  f"{row['tokens_per_s']:>9.1f} | {scaling:.2f}x")  # fmt: skip
            table[f"{name}/{processes}"] = row
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
