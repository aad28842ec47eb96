"""Training under several processes, run by ``torch.distributed.run`` (or plainly, as the one-process reference).

Usage: train_worker.py BACKEND MODEL_DIR OUT_DIR
  BACKEND  single (no launcher) | ddp | zero2 | zero3

What it does, on every backend:
  invariance  GRPO (whitened advantages, KL to the reference), REINFORCE (batch-normalised returns) and PPO
              (whitened GAE advantages, critic adapter + value head) learn for
              3 steps from one fixed global batch of 8 rows, each rank holding its contiguous share, under a
              cosine LR schedule; with micro-batches of 2 (gradient accumulation) and of the whole share.
              Writes the per-step losses, gradient norms and LRs, and the final adapters (rank 0).
  algorithms  GRPO, PPO, REINFORCE (finetune_llm_reasoning), DPO (finetune_llm_preference) and SFT
              (finetune_llm_sft) each train 3 steps through their loops, with a held-out evaluation at the end;
              records which prompts each rank served and a checksum of every rank's trained weights.
  population  (ddp, zero2; zero3 refuses) a population of 2 GRPO agents evolves twice (tournament + mutation; clones wrapped like their
              parents); records every rank's members, hyperparameters, fitness and weights.
Results: OUT_DIR/result.json (rank 0) and OUT_DIR/<name>.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from agilerl_llm import (  # noqa: E402
    DPO,
    GRPO,
    LLMPPO,
    SFT,
    CosineLRScheduleConfig,
    HyperparameterConfig,
    LLMReinforce,
    MetricsLogger,
    Mutations,
    PreferenceGym,
    ReasoningGym,
    RLParameter,
    SFTGym,
    TournamentSelection,
    finetune_llm_preference,
    finetune_llm_reasoning,
    finetune_llm_sft,
    make_accelerator,
)
from agilerl_llm.distributed import gathered  # noqa: E402

GLOBAL_ROWS, GROUP, STEPS = 8, 4, 3
QUESTIONS = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 80, 10) for b in range(4)]


def make_accelerator_for(backend: str):
    if backend == "single":
        return None
    if backend == "ddp":
        return make_accelerator()
    from accelerate.utils import DeepSpeedPlugin

    return make_accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=int(backend[-1])))


def is_zero3(accelerator) -> bool:
    plugin = None if accelerator is None else getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and int(plugin.zero_stage) == 3


def global_batch(seed: int = 0):
    """The same 8 rows on every rank: (ids, action mask, rewards (2 groups of 4))."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (GLOBAL_ROWS, 12), generator=generator)
    action_mask = torch.zeros(GLOBAL_ROWS, 11, dtype=torch.bool)
    for row in range(GLOBAL_ROWS):  # ragged completions, so the token normaliser matters
        action_mask[row, 4 : 6 + row] = True
    rewards = torch.rand(GLOBAL_ROWS // GROUP, GROUP, generator=generator, dtype=torch.float64)
    return ids, action_mask, rewards


def trainable_weights(agent) -> dict[str, torch.Tensor]:
    """Every trainable tensor (LoRA adapters, PPO's value head), full size even under ZeRO-3."""
    named = {name: p for name, p in agent.policy_forward_module.named_parameters() if p.requires_grad}
    with gathered(list(named.values())):
        return {name: p.detach().to("cpu", torch.float64).clone() for name, p in named.items()}


def checksum(weights: dict[str, torch.Tensor]) -> list[float]:
    return [float(weights[name].sum()) * (i + 1) for i, name in enumerate(sorted(weights))]


def invariance(accelerator, model_dir, tokenizer, out: Path, rank: int, world: int) -> dict:
    results = {}
    ids, action_mask, rewards = global_batch()
    share = GLOBAL_ROWS // world
    rows = slice(rank * share, (rank + 1) * share)
    for name, cls, extra in (
        ("grpo", GRPO, {"group_size": GROUP, "beta": 0.05, "whiten_advantages": True}),
        ("reinforce", LLMReinforce, {"beta": 0.05}),
        ("ppo", LLMPPO, {"beta": 0.05}),  # whitened GAE advantages; the value head trains with the adapters
    ):
        for micro in (2, share):
            agent = cls(
                tokenizer.pad_token_id,
                tokenizer.pad_token,
                # float64: the comparison then shows the step's definition, not float32 rounding (which Adam's
                # normalisation magnifies on near-zero gradients)
                actor_network=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
                batch_size=share,  # one optimizer step per learn() on every world size
                micro_batch_size_per_gpu=micro,
                lr=1e-2,
                max_grad_norm=0.5,
                seed=3,
                accelerator=accelerator,
                gradient_checkpointing=False,
                cosine_lr_schedule_config=CosineLRScheduleConfig(num_epochs=4, warmup_proportion=0.25),
                **extra,
            )
            my_rewards = rewards.flatten()[rows].view(-1, GROUP) if name == "grpo" else rewards.flatten()[rows]
            steps = []
            for _ in range(STEPS):
                metrics = agent.learn((ids[rows], action_mask[rows], my_rewards))
                steps.append({key: metrics[key] for key in ("mean_loss", "mean_kl", "grad_norm", "lr")})
            weights = trainable_weights(agent)
            sums = agent.dist.gather_objects(checksum(weights))
            tag = f"{name}_micro{micro if micro < share else 'all'}"
            results[tag] = {"steps": steps, "ranks_agree": all(s == sums[0] for s in sums)}
            if rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{tag}.safetensors"))
            agent.clean_up()
    return results


class RecordingGym(ReasoningGym):
    """Remembers the questions of every training batch it served."""

    served: list[str]

    def _next_batch(self):
        batch = super()._next_batch()
        if batch is not None and not self._evaluating:
            self.served = [*getattr(self, "served", []), *batch.questions]
        return batch


def reward(completion: str, answer: str, prompt: str) -> float:
    return completion.count("1") / 4 + len(completion) / 40


def algorithms(accelerator, model_dir, tokenizer, rank: int) -> dict:
    results = {}
    common = {
        "lr": 1e-2,
        "seed": 5,
        "accelerator": accelerator,
        "gradient_checkpointing": False,
        "micro_batch_size_per_gpu": 2,
    }
    rollout = {"max_output_tokens": 3, "beta": 0.05, "group_size": 2, "batch_size": 4}
    for name, cls in (("grpo", GRPO), ("ppo", LLMPPO), ("reinforce", LLMReinforce)):
        network = AutoModelForCausalLM.from_pretrained(model_dir)
        agent = cls(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=network, **rollout, **common)
        env = RecordingGym(QUESTIONS[:24], QUESTIONS[24:29], tokenizer, reward, data_batch_size_per_gpu=2, seed=1)
        _, history = finetune_llm_reasoning([agent], env, max_steps=STEPS, evaluation_interval=STEPS,
                                            evaluate_at_start=False, logger=MetricsLogger(print_every=0),
                                            progress=False)  # fmt: skip
        served = agent.dist.gather_objects(env.served)
        sums = agent.dist.gather_objects(checksum(trainable_weights(agent)))
        evals = agent.dist.gather_objects([row.get("eval/reward") for row in history])
        results[name] = {
            "served": served,
            "ranks_agree": all(s == sums[0] for s in sums),
            "evals_agree": all(e == evals[0] for e in evals),
            "last": history[-1],
        }
        agent.clean_up()
    pairs = [{"prompt": q["question"], "chosen": q["answer"], "rejected": q["answer"][::-1] + "9"} for q in QUESTIONS]
    sft_rows = [{"prompt": q["question"], "completion": q["answer"]} for q in QUESTIONS]
    offline = {
        "dpo": (DPO, PreferenceGym(pairs[:24], pairs[24:29], tokenizer, data_batch_size_per_gpu=4), finetune_llm_preference),
        "sft": (SFT, SFTGym(sft_rows[:24], sft_rows[24:29], tokenizer, data_batch_size_per_gpu=4), finetune_llm_sft),
    }  # fmt: skip
    for name, (cls, env, finetune) in offline.items():
        agent = cls(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
                    batch_size=4, **common)  # fmt: skip
        _, history = finetune([agent], env, max_steps=STEPS, evaluation_interval=STEPS, evaluate_at_start=False,
                              logger=MetricsLogger(print_every=0), progress=False)  # fmt: skip
        sums = agent.dist.gather_objects(checksum(trainable_weights(agent)))
        evals = agent.dist.gather_objects([row.get("eval/loss") for row in history])
        results[name] = {
            "ranks_agree": all(s == sums[0] for s in sums),
            "evals_agree": all(e == evals[0] for e in evals),
            "last": history[-1],
        }
        agent.clean_up()
    return results


def population(accelerator, model_dir, tokenizer) -> dict:
    hp = HyperparameterConfig(lr=RLParameter(min=1e-4, max=1e-1))
    pop = GRPO.population(2, pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
                          actor_network=AutoModelForCausalLM.from_pretrained(model_dir), hp_config=hp, group_size=2,
                          batch_size=4, max_output_tokens=3, lr=1e-2, seed=2, accelerator=accelerator,
                          gradient_checkpointing=False)  # fmt: skip
    env = ReasoningGym(QUESTIONS[:24], QUESTIONS[24:29], tokenizer, reward, data_batch_size_per_gpu=2, seed=1)
    tournament = TournamentSelection(tournament_size=2, elitism=True, population_size=2, eval_loop=1, rand_seed=4)
    mutation = Mutations(no_mutation=0.0, rl_hp=1.0, rand_seed=5)
    pop, history = finetune_llm_reasoning(pop, env, max_steps=5, evaluation_interval=2, evaluate_at_start=False,
                                          logger=MetricsLogger(print_every=0), progress=False, evo_steps=2,
                                          tournament=tournament, mutation=mutation)  # fmt: skip
    members = [(agent.index, agent.lr, agent.fitness, checksum(trainable_weights(agent))) for agent in pop]
    every_rank = pop[0].dist.gather_objects(members)
    return {"members": every_rank, "history_rows": len(history)}


def differently_seeded(accelerator, model_dir, tokenizer, rank: int) -> dict:
    """Ranks seeded differently still start from the same adapters (rank 0's), the frozen reference included."""
    agent = GRPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
                 seed=100 + rank, accelerator=accelerator, gradient_checkpointing=False, group_size=2, batch_size=4)  # fmt: skip
    named = {name: p for name, p in agent.actor.named_parameters() if "lora_" in name}
    with gathered(list(named.values())):
        weights = {name: p.detach().to("cpu", torch.float64).clone() for name, p in named.items()}
    sums = agent.dist.gather_objects(checksum(weights))
    agent.clean_up()
    return {
        "ranks_agree": all(s == sums[0] for s in sums),
        "reference_included": any(".reference." in n for n in named),
    }


def main() -> None:
    backend, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator_for(backend)
    rank = 0 if accelerator is None else accelerator.process_index
    world = 1 if accelerator is None else accelerator.num_processes
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = {"backend": backend, "world_size": world}
    result["invariance"] = invariance(accelerator, model_dir, tokenizer, out, rank, world)
    if backend != "single":
        result["differently_seeded"] = differently_seeded(accelerator, model_dir, tokenizer, rank)
        result["algorithms"] = algorithms(accelerator, model_dir, tokenizer, rank)
    if backend in ("ddp", "zero2"):
        result["population"] = population(accelerator, model_dir, tokenizer)
    if backend == "zero3":  # populations, and PPO with checkpointing, are refused there, saying what to use instead
        try:
            population(accelerator, model_dir, tokenizer)
        except NotImplementedError as error:
            result["population_error"] = str(error)
        try:
            LLMPPO(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
                   accelerator=accelerator, gradient_checkpointing=True)  # fmt: skip
        except NotImplementedError as error:
            result["ppo_error"] = str(error)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
