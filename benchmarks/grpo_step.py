"""Wall time of one GRPO training iteration (generation + learn) on the CPU: ours vs TRL's ``GRPOTrainer``.

Usage::

    python benchmarks/grpo_step.py                                   # ours; TRL too if importable here
    python benchmarks/grpo_step.py --trl-python /work/venv-trl/bin/python
    python benchmarks/grpo_step.py --quick --no-trl                  # smoke run (tests/test_benchmarks_grpo.py)

One iteration = 8 prompts x 8 completions x exactly 16 new tokens (``min_new_tokens = max_new_tokens``),
sampled with the actor, scored by a cheap reward function, then ONE optimizer step over the 64 completions:
a no-grad reference forward (the base model, adapter disabled), one forward+backward of the LoRA policy and an
AdamW step. Both sides: the same saved tiny Qwen2 model (``agilerl_llm.testing.save_tiny_model``), fp32, LoRA
r=16 / alpha=32 / dropout 0 on every linear layer but the lm_head, no gradient checkpointing, beta=0.001, the same
sampling settings, 2 torch threads. Old log-probs are skipped on both sides (one update per generation, so they
equal the current ones). Prompts all have the same token length, so both sides process identical shapes.

Each implementation runs in its own process (``--worker ours`` with this interpreter, ``--worker trl`` with
``--trl-python``, which needs ``trl`` but not this package). The two workers run in lock step: the driver lets one
iteration of one worker run at a time, alternating which goes first, so load from other processes on a shared
machine lands on both alike. ``--warmup`` iterations are dropped, then medians over ``--iterations`` are reported:

* s/iter: wall time of one iteration (ours: ``get_action`` -> ``env.step`` (rewards, next prompts) -> ``learn``;
  TRL: ``on_step_begin`` -> ``on_step_end``, i.e. generation, rewards, reference log-probs, forward+backward,
  grad clipping, optimizer step; its logging/saving hooks after the step are outside);
* generate s: the call that samples the 64 completions (ours: ``agent.get_action``; TRL:
  ``GRPOTrainer._generate_single_turn``, i.e. prompt padding + ``model.generate`` + eos masking);
* learn s: s/iter - generate s, per iteration;
* tokens/s: generated tokens per second of iteration time (64 x 16 / s/iter);
* vs TRL: median s/iter divided by TRL's. Target: ours <= 0.7.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.7
MESSAGE_PREFIX = "@@grpo_step "  # worker -> driver protocol lines on stdout; anything else is ignored

# The benchmark shape and every hyperparameter both implementations share.
FULL_SHAPE = {"size": "tiny", "prompts": 8, "group_size": 8, "new_tokens": 16, "warmup": 2, "iterations": 12}
QUICK_SHAPE = {"size": "nano", "prompts": 2, "group_size": 2, "new_tokens": 4, "warmup": 1, "iterations": 2}
SHARED = {
    "threads": 2,
    "lora_r": 16,
    "lora_alpha": 32,
    "beta": 0.001,
    "lr": 1e-5,
    "max_grad_norm": 1.0,
    "clip": 0.2,
    "temperature": 0.9,
    "top_p": 0.95,
    "top_k": 50,
    "seed": 0,
}
LABELS = {"ours": "agilerl_llm GRPO", "trl": "TRL GRPOTrainer"}


# ------------------------------------------------------------------------------------------ shared by both workers
def questions() -> list[dict[str, str]]:
    """Addition questions of one fixed width ("17+35="), so every prompt has the same token length."""
    return [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 100, 7) for b in range(10, 100, 5)]


def digit_fraction(completion: str) -> float:
    """The reward: the fraction of digit characters (cheap, and not constant over a group)."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def _announce(kind: str, payload: dict) -> None:
    print(f"{MESSAGE_PREFIX}{kind} {json.dumps(payload)}", flush=True)


def _wait_for_turn() -> None:
    """Block until the driver says go (one line on stdin)."""
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the driver went away")


def _setup_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _lora_config(config: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    return versions


# ------------------------------------------------------------------------------------------ our GRPO
def run_ours(config: dict) -> None:
    _setup_process(config["threads"])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO_ROOT))
    from agilerl_llm import GRPO
    from agilerl_llm.envs.reasoning import ReasoningGym

    model_dir = Path(config["model_dir"])
    if not (model_dir / "config.json").exists():
        from agilerl_llm.testing import save_tiny_model

        save_tiny_model(model_dir, config["size"], architecture="qwen2", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    agent = GRPO(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=model,
        lora_config=_lora_config(config),
        group_size=config["group_size"],
        beta=config["beta"],
        clip_coef=config["clip"],
        lr=config["lr"],
        max_grad_norm=config["max_grad_norm"],
        batch_size=config["prompts"] * config["group_size"],  # one optimizer step over all completions
        update_epochs=1,
        use_separate_reference_adapter=False,  # reference = base model, as TRL does for a new PEFT adapter
        gradient_checkpointing=False,
        temperature=config["temperature"],
        top_p=config["top_p"],
        top_k=config["top_k"],
        max_output_tokens=config["new_tokens"],
        min_output_tokens=config["new_tokens"],
        seed=config["seed"],
    )
    data = questions()
    env = ReasoningGym(
        data, data[:8], tokenizer, lambda c, a, p: digit_fraction(c), data_batch_size_per_gpu=config["prompts"]
    )
    prompts = env.reset()
    _announce("ready", _versions())
    for _ in range(config["warmup"] + config["iterations"]):
        _wait_for_turn()
        cpu, start = time.process_time(), time.perf_counter()
        result = agent.get_action(prompts)
        generated = time.perf_counter()
        prompts, rewards = env.step(result)
        agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
        end = time.perf_counter()
        _announce(
            "iteration",
            {
                "iteration_s": end - start,
                "generate_s": generated - start,
                "cpu_s": time.process_time() - cpu,
                "tokens": int(result.completion_lengths.sum()),
                "threads": torch.get_num_threads(),
            },
        )


# ------------------------------------------------------------------------------------------ TRL's GRPOTrainer
def run_trl(config: dict) -> None:
    _setup_process(config["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=torch.float32)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": q["question"]}], "answer": q["answer"]} for q in questions()]
    )

    def reward(completions, **kwargs):
        return [digit_fraction(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    steps = config["warmup"] + config["iterations"]
    with tempfile.TemporaryDirectory() as output_dir:
        args = GRPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=config["prompts"] * config["group_size"],  # 8 prompts x 8 completions ...
            gradient_accumulation_steps=1,  # ... and one optimizer step over them
            num_generations=config["group_size"],
            num_iterations=1,
            max_completion_length=config["new_tokens"],
            generation_kwargs={"min_new_tokens": config["new_tokens"]},
            temperature=config["temperature"],
            top_p=config["top_p"],
            top_k=config["top_k"],
            beta=config["beta"],
            epsilon=config["clip"],
            loss_type="dapo",  # token mean over the optimizer batch, like ours
            scale_rewards="group",
            learning_rate=config["lr"],
            lr_scheduler_type="constant",
            weight_decay=0.0,
            optim="adamw_torch",
            max_grad_norm=config["max_grad_norm"],
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            max_steps=steps,
            logging_steps=steps + 1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=config["seed"],
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora_config(config),
        )
        current: dict = {}

        class LockStepTimer(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                _wait_for_turn()
                current.update(cpu=time.process_time(), start=time.perf_counter())

            def on_step_end(self, *args, **kwargs):
                end = time.perf_counter()
                _announce(
                    "iteration",
                    {
                        "iteration_s": end - current["start"],
                        "generate_s": current["generate_s"],
                        "cpu_s": time.process_time() - current["cpu"],
                        "tokens": current["tokens"],
                        "threads": torch.get_num_threads(),
                    },
                )

        generate = trainer._generate_single_turn

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            output = generate(*args, **kwargs)
            current.update(generate_s=time.perf_counter() - start, tokens=sum(len(ids) for ids in output[0]))
            return output

        trainer._generate_single_turn = timed_generate
        trainer.add_callback(LockStepTimer())
        _announce("ready", _versions())
        trainer.train()


WORKERS = {"ours": run_ours, "trl": run_trl}


# ------------------------------------------------------------------------------------------ driver
def trl_available(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('trl') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0
    except OSError:
        return False


class Worker:
    """One implementation's process, driven one iteration at a time over stdin/stdout."""

    def __init__(self, name: str, python: str, config: dict, log_dir: Path) -> None:
        self.name, self.python = name, python
        self.log_path = log_dir / f"{name}.stderr"
        env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]), MKL_NUM_THREADS=str(config["threads"]))
        env |= {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--worker", name, "--config", json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )

    def receive(self, kind: str) -> dict:
        for line in self.process.stdout:
            if line.startswith(MESSAGE_PREFIX):
                got, payload = line[len(MESSAGE_PREFIX) :].split(" ", 1)
                if got == kind:
                    return json.loads(payload)
        self.process.wait()
        raise RuntimeError(
            f"the {self.name} worker ({self.python}) exited with {self.process.returncode} before sending "
            f"{kind!r}:\n{self.log_path.read_text()[-8000:]}"
        )

    def iterate(self) -> dict:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return self.receive("iteration")

    def finish(self) -> None:
        self.process.stdin.close()
        if self.process.wait(timeout=120) != 0:
            raise RuntimeError(f"the {self.name} worker failed at exit:\n{self.log_path.read_text()[-8000:]}")


def summarise(iterations: list[dict], warmup: int, versions: dict) -> dict:
    measured = iterations[warmup:]
    iteration_s = [it["iteration_s"] for it in measured]
    median_iteration = statistics.median(iteration_s)
    tokens = statistics.median(it["tokens"] for it in measured)
    return {
        "iteration_s": median_iteration,
        "generate_s": statistics.median(it["generate_s"] for it in measured),
        "learn_s": statistics.median(it["iteration_s"] - it["generate_s"] for it in measured),
        "cpu_s": statistics.median(it["cpu_s"] for it in measured),
        "tokens_per_iteration": tokens,
        "tokens_per_s": tokens / median_iteration,
        "iterations": measured,
        "versions": versions,
    }


def measure(pythons: dict[str, str], config: dict) -> dict[str, dict]:
    """Run the workers in lock step: iteration i of every worker, alternating which one goes first."""
    with tempfile.TemporaryDirectory() as log_dir:
        workers = {}
        try:
            # Ours first: it writes the model folder the TRL worker then reads.
            workers["ours"] = Worker("ours", pythons["ours"], config, Path(log_dir))
            versions = {"ours": workers["ours"].receive("ready")}
            for name in [n for n in pythons if n != "ours"]:
                workers[name] = Worker(name, pythons[name], config, Path(log_dir))
                versions[name] = workers[name].receive("ready")
            iterations: dict[str, list[dict]] = {name: [] for name in workers}
            order = list(workers)
            for _ in range(config["warmup"] + config["iterations"]):
                for name in order:
                    iterations[name].append(workers[name].iterate())
                order.reverse()
            for worker in workers.values():
                worker.finish()
        finally:
            for worker in workers.values():
                if worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait()
    return {name: summarise(its, config["warmup"], versions[name]) for name, its in iterations.items()}


def format_table(results: dict[str, dict]) -> str:
    header = (
        f"{'implementation':<17}| {'s/iter':>7} | {'generate s':>10} | {'learn s':>7} | {'tokens/s':>8} | {'vs TRL':>6}"
    )
    lines = [header, "-" * len(header)]
    trl = results.get("trl")
    for name, result in results.items():
        ratio = f"{result['iteration_s'] / trl['iteration_s']:.2f}x" if trl else "n/a"
        lines.append(
            f"{LABELS[name]:<17}| {result['iteration_s']:>7.3f} | {result['generate_s']:>10.3f} | "
            f"{result['learn_s']:>7.3f} | {result['tokens_per_s']:>8.0f} | {ratio:>6}"
        )
    return "\n".join(lines)


def footer(results: dict[str, dict], quick: bool) -> list[str]:
    lines = []
    for name, result in results.items():
        versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        lines.append(
            f"{LABELS[name]}: {versions}; {result['tokens_per_iteration']:.0f} generated tokens/iteration; "
            f"CPU time {result['cpu_s']:.3f} s/iteration (median)"
        )
    if "trl" in results:
        ours, trl = results["ours"]["iterations"], results["trl"]["iterations"]
        ratio = results["ours"]["iteration_s"] / results["trl"]["iteration_s"]
        paired = statistics.median(a["iteration_s"] / b["iteration_s"] for a, b in zip(ours, trl, strict=True))
        cpu_ratio = results["ours"]["cpu_s"] / results["trl"]["cpu_s"]
        scope = "info (smoke run, no target)" if quick else "target"
        lines.append(
            f"{scope}: ours / TRL wall time = {ratio:.2f} (<= {TARGET_RATIO}: "
            f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); median of per-iteration ratios {paired:.2f}; "
            f"CPU time ratio {cpu_ratio:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, dict] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="nano model, 2 prompts x 2 x 4 tokens: a smoke run")
    parser.add_argument("--size", help="tiny model size (nano/tiny/small/30m); default tiny (nano with --quick)")
    parser.add_argument("--iterations", type=int, help="measured iterations after warm-up (default 12)")
    parser.add_argument("--warmup", type=int, help="warm-up iterations, not measured (default 2)")
    parser.add_argument("--threads", type=int, help=f"torch threads in both workers (default {SHARED['threads']})")
    parser.add_argument("--trl-python", help="python with trl installed; default: this one if it has trl")
    parser.add_argument("--no-trl", action="store_true", help="measure ours only")
    parser.add_argument("--model-dir", help="reuse (or create) the model folder here instead of a temporary one")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        WORKERS[args.worker](json.loads(args.config))
        return None

    shape = dict(QUICK_SHAPE if args.quick else FULL_SHAPE)
    for key in ("size", "iterations", "warmup"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if shape["iterations"] < 1 or shape["warmup"] < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--iterations and --threads must be >= 1 and --warmup >= 0")
    shared = SHARED | ({"threads": args.threads} if args.threads else {})
    pythons, note = {"ours": sys.executable}, "TRL skipped (--no-trl)."
    if not args.no_trl:
        candidate = args.trl_python or sys.executable
        if trl_available(candidate):
            pythons["trl"] = candidate
        else:
            note = f"TRL skipped: trl is not importable by {candidate}; pass --trl-python PATH."

    print(
        f"GRPO iteration on CPU: {shape['size']} qwen2, {shape['prompts']} prompts x {shape['group_size']} completions "
        f"x {shape['new_tokens']} new tokens, LoRA r={shared['lora_r']} alpha={shared['lora_alpha']} all-linear, "
        f"beta={shared['beta']}, fp32, {shared['threads']} thread{'s' if shared['threads'] != 1 else ''}; median of {shape['iterations']} iterations after "
        f"{shape['warmup']} warm-up",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        config = shared | shape | {"model_dir": args.model_dir or str(Path(scratch) / f"{shape['size']}_qwen2")}
        results = measure(pythons, config)
    print(format_table(results))
    print("\n".join(footer(results, args.quick)))
    if "trl" not in results:
        print(note)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
