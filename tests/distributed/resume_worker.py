"""A tiny GRPO or PPO run in its own process, for the crash / resume tests of run checkpoints.

Usage: resume_worker.py MODE MODEL_DIR CKPT_DIR OUT_DIR TOTAL_STEPS INTERVAL [ALGORITHM [SAVE]]
  ALGORITHM  grpo (default) or ppo;  SAVE  sync (default) or async (CheckpointConfig.save_async).
  full    train TOTAL_STEPS steps in one go (checkpointing every INTERVAL steps) and write the results.
  crash   same, but at the log of step INTERVAL+1, once the step-INTERVAL checkpoint is complete (with SAVE=async
          its write may still be running then, so this waits for the "latest" pointer), write OUT_DIR/ready and
          sleep, waiting for the parent's SIGKILL.
  resume  build everything afresh, resume from the newest checkpoint under CKPT_DIR, finish the run.
Results: OUT_DIR/history.json (per-step metrics) and OUT_DIR/adapters.safetensors (every LoRA parameter, and the
tensors of every extra checkpoint module such as PPO's value head, as ``module.<name>.<key>``).

Under ``torch.distributed.run`` (several processes) the agent trains data parallel; the main process writes the
results and every other rank r writes OUT_DIR/adapters_rank<r>.safetensors, to check that the ranks agree.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from agilerl_llm import GRPO, LLMPPO, make_accelerator  # noqa: E402
from agilerl_llm.checkpoint import CheckpointConfig  # noqa: E402
from agilerl_llm.checkpoint.run import POINTER_FILE  # noqa: E402
from agilerl_llm.distributed import launched_world_size  # noqa: E402
from agilerl_llm.envs.reasoning import ReasoningGym  # noqa: E402
from agilerl_llm.training.logging import MetricsLogger  # noqa: E402
from agilerl_llm.training.reasoning import finetune_llm_reasoning  # noqa: E402

DATA = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 70, 10) for b in range(3)]
DETERMINISTIC = (
    "reward/mean",
    "reward/std",
    "loss/policy",
    "loss/kl",
    "loss/value",
    "policy/grad_norm",
    "completion/length",
)


def reward(completion: str, answer: str, prompt: str) -> float:
    return completion.count("1") / 5 + 0.1 * len(completion) / 20


class StallingLogger(MetricsLogger):
    """Blocks at ``stall_step``'s log, after announcing it, so the parent can kill the process mid-run.

    It announces only once the previous step's checkpoint is complete (the "latest" pointer names it): an async save
    of that step may still be writing when the next step logs.
    """

    def __init__(self, stall_step: int | None, ready: Path, pointer: Path) -> None:
        super().__init__(print_every=0)
        self.stall_step, self.ready, self.pointer = stall_step, ready, pointer

    def _previous_step_saved(self) -> bool:
        return self.pointer.exists() and self.pointer.read_text().strip() == str(self.stall_step - 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        super().log(step, metrics)
        if step == self.stall_step:
            deadline = time.monotonic() + 120
            while not self._previous_step_saved() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.ready.write_text(str(step))
            time.sleep(600)


def launch_accelerator():
    """None in a plain process; under a launcher data parallel, or DeepSpeed ZeRO-<n> with RESUME_WORKER_ZERO=n."""
    stage = os.environ.get("RESUME_WORKER_ZERO")
    if stage:
        from accelerate.utils import DeepSpeedPlugin

        return make_accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=int(stage)))
    return make_accelerator() if launched_world_size() > 1 else None


def main() -> None:
    mode, model_dir, ckpt_dir, out_dir, total, interval = sys.argv[1:7]
    algorithm = sys.argv[7] if len(sys.argv) > 7 else "grpo"
    save_async = len(sys.argv) > 8 and sys.argv[8] == "async"
    total, interval, out = int(total), int(interval), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = {
        "actor_network": AutoModelForCausalLM.from_pretrained(model_dir),
        "max_output_tokens": 4,
        "beta": 0.05,
        "lr": 5e-2,
        "seed": 7,
        "gradient_checkpointing": False,
        "accelerator": launch_accelerator(),
    }
    if algorithm == "ppo":
        agent = LLMPPO(tokenizer.pad_token_id, tokenizer.pad_token, group_size=2, batch_size=4, **common)
    else:
        agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, group_size=3, batch_size=6, **common)
    env = ReasoningGym(DATA[:15], DATA[15:17], tokenizer, reward, data_batch_size_per_gpu=2, seed=3)
    config = CheckpointConfig(path=ckpt_dir, interval=interval, resume="latest", save_async=save_async)
    logger = StallingLogger(interval + 1 if mode == "crash" else None, out / "ready", Path(ckpt_dir) / POINTER_FILE)
    _, history = finetune_llm_reasoning(
        [agent],
        env,
        max_steps=total,
        evaluation_interval=1000,
        evaluate_at_start=False,
        logger=logger,
        progress=False,
        checkpoint=config,
    )
    rows = [
        {key: row[key] for key in ("step", "agent", *DETERMINISTIC, "eval/reward") if key in row} for row in history
    ]
    rank = agent.dist.rank
    if rank == 0:
        (out / "history.json").write_text(json.dumps(rows))
    weights = {name: p.detach().clone().contiguous() for name, p in agent.actor.named_parameters() if "lora_" in name}
    for module_name, spec in agent.checkpoint_modules().items():
        for key, tensor in spec.module.state_dict().items():
            weights[f"module.{module_name}.{key}"] = tensor.detach().clone().contiguous()
    save_file(weights, str(out / ("adapters.safetensors" if rank == 0 else f"adapters_rank{rank}.safetensors")))


if __name__ == "__main__":
    main()
