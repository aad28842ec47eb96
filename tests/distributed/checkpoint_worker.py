"""Run under ``torchrun --nproc_per_node 2``: DeepSpeed ZeRO-<stage> agents save and load every grid cell.

Usage: checkpoint_worker.py STAGE MODEL_DIR OUT_DIR. Rank 0 writes OUT_DIR/result.json (every check that
passed) and OUT_DIR/expected.pt (the trained agent's full weights, gathered), for the test to inspect.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import deepspeed
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from transformers import AutoModelForCausalLM, AutoTokenizer

from agilerl_llm import GRPO

CELLS = [(True, True), (True, False), (False, True), (False, False)]  # (lora_only, save_optimizer)


def make_agent(accelerator, model_dir, tokenizer, seed):
    return GRPO(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
        group_size=4,
        batch_size=4,
        beta=0.05,
        lr=1e-2,
        seed=seed,
        accelerator=accelerator,
        gradient_checkpointing=False,
    )


def learn(agent, rank, seed):
    generator = torch.Generator().manual_seed(seed * 10 + rank)  # each rank learns from its own rows
    ids = torch.randint(3, 40, (4, 10), generator=generator)
    action_mask = torch.zeros(4, 9, dtype=torch.long)
    action_mask[:, 4:] = 1
    torch.manual_seed(0)
    return agent.learn((ids, action_mask, torch.rand(1, 4, generator=generator)))


def full_weights(agent):
    parameters = dict(agent.actor.named_parameters())
    with deepspeed.zero.GatheredParameters(list(parameters.values())):  # a no-op below ZeRO-3
        return {name: p.detach().clone() for name, p in parameters.items()}


def differing(a, b):
    return sorted(name for name in a if not torch.equal(a[name], b[name]))


def main() -> None:
    stage, model_dir, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    plugin = DeepSpeedPlugin(zero_stage=stage)
    # On a machine without GPUs Accelerate needs the backend named to start the process group.
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result: dict[str, object] = {"stage": stage}

    trained = make_agent(accelerator, model_dir, tokenizer, seed=1)
    learn(trained, rank, 0)
    expected = full_weights(trained)
    for lora_only, save_optimizer in CELLS:
        trained.save_checkpoint(out / f"cell_{int(lora_only)}{int(save_optimizer)}", lora_only, save_optimizer)
    # The reference run: one more step from the saved state (done now, while its engine is Accelerate's
    # current one: accelerator.backward drives the most recently prepared engine).
    next_metrics = learn(trained, rank, 1)
    next_weights = full_weights(trained)

    for lora_only, save_optimizer in CELLS:
        name = f"cell_{int(lora_only)}{int(save_optimizer)}"
        restored = make_agent(accelerator, model_dir, tokenizer, seed=7)
        # The base as built, before the load, and the fresh model's base against the trained agent's: separates
        # "the load wrote a base weight" from "the agent was built (or an earlier engine's teardown left it)
        # with another base" (the flake this check was added for).
        built = {n: t for n, t in full_weights(restored).items() if "lora_" not in n}
        cell = {"base_differs_before_load": differing(built, {n: expected[n] for n in built})}
        restored.load_checkpoint(out / name, load_optimizer=save_optimizer, overwrite_reference_adapter=True)
        cell["files"] = sorted(str(p.relative_to(out / name)) for p in (out / name).iterdir())
        after = full_weights(restored)
        cell["base_changed_by_load"] = differing(built, {n: after[n] for n in built})
        cell["weights_differ"] = differing(expected, after)
        if save_optimizer:
            metrics = learn(restored, rank, 1)
            cell["next_step_metrics_equal"] = metrics == next_metrics
            cell["next_step_weights_differ"] = differing(next_weights, full_weights(restored))
        result[name] = cell
        restored.clean_up()
        # Tear the released engine down now, on both ranks together, rather than whenever the garbage collector
        # gets to it: a ZeRO-3 CI run once saw a base weight differ in the next cell (not reproduced since).
        gc.collect()
        accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(expected, out / "expected.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
