"""Population training in the finetune loops: evolution every evo_steps, checkpoints of every member, exact resume
with the fitness history, HF exports, and the loops' argument checks. Real tiny models, real files."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm import GRPO, SFT
from agilerl_llm.checkpoint import CheckpointConfig
from agilerl_llm.envs.reasoning import ReasoningGym
from agilerl_llm.envs.sft import SFTGym
from agilerl_llm.evolution import HyperparameterConfig, Mutations, RLParameter, TournamentSelection
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.loop import fitness_table
from agilerl_llm.training.reasoning import finetune_llm_reasoning
from agilerl_llm.training.sft import finetune_llm_sft

DATA = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(0, 50, 10) for b in range(3)]


def reward(completion: str, answer: str, prompt: str) -> float:
    """Partial credit for answer characters, so members differ in fitness."""
    return sum(c in completion for c in answer) / len(answer)


def grpo_population(model_dir, tokenizer, size=3, seed=1):
    hp = HyperparameterConfig(lr=RLParameter(min=1e-3, max=5e-2), temperature=RLParameter(min=0.5, max=1.5))
    return GRPO.population(
        size,
        pad_token_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(model_dir),
        hp_config=hp,
        group_size=2,
        batch_size=4,
        max_output_tokens=3,
        lr=1e-2,
        seed=seed,
        gradient_checkpointing=False,
    )


def make_env(tokenizer):
    return ReasoningGym(DATA[:10], DATA[10:], tokenizer, reward, data_batch_size_per_gpu=2, seed=5)


def evolution(size, seed=3):
    return {
        "evo_steps": 2,
        "tournament": TournamentSelection(
            tournament_size=2, elitism=True, population_size=size, eval_loop=1, rand_seed=seed
        ),
        "mutation": Mutations(no_mutation=0.0, rl_hp=1.0, rand_seed=seed),
    }


def lora_weights(pop):
    return [{n: p.detach().clone() for n, p in a.actor.named_parameters() if "lora_" in n} for a in pop]


class StopAfter(MetricsLogger):
    """A logger that interrupts the run when the first metric of ``step`` arrives (a crash mid-run)."""

    def __init__(self, step: int) -> None:
        super().__init__(print_every=0)
        self.stop_step = step

    def log(self, step, metrics):
        if step == self.stop_step:
            raise KeyboardInterrupt(f"stopped at step {step}")


def comparable(history):
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in history]


def test_population_evolves_every_evo_steps(tiny_model_dir, tokenizer):
    pop = grpo_population(tiny_model_dir, tokenizer)
    base_ptrs = {n: p.data_ptr() for n, p in pop[0].actor.named_parameters() if "lora_" not in n}
    pop, history = finetune_llm_reasoning(
        pop, make_env(tokenizer), max_steps=5, evaluation_interval=5, progress=False, **evolution(3)
    )
    assert len(pop) == 3
    # evaluated at 0, at both evolution steps (2, 4) and at the end; no evolution on the last step
    assert sorted({row["step"] for row in history if "eval/reward" in row}) == [0.0, 2.0, 4.0, 5.0]
    indices = {int(row["agent"]) for row in history}
    assert max(indices) >= 3, "tournament children get fresh indices"
    for row in history:
        assert 1e-3 <= row["hp/lr"] <= 5e-2 and 0.5 <= row["hp/temperature"] <= 1.5
    for agent in pop:
        assert len(agent.fitness) >= 1 and not math.isnan(agent.fitness[-1])
        # every member, clones included, still stands on the one base model
        for name, param in agent.actor.named_parameters():
            if "lora_" not in name:
                assert param.data_ptr() == base_ptrs[name], name
    table = fitness_table(pop)
    assert "lr" in table and "temperature" in table and "fitness" in table


@pytest.mark.parametrize("save_async", [False, True], ids=["sync", "async"])
def test_population_resume_restores_members_and_fitness_history(tiny_model_dir, tokenizer, tmp_path, save_async):
    """8 steps straight vs. interrupted in step 5 (after step 4's checkpoint) and resumed in a fresh population.

    The generation at step 6 comes after the resume, so its tournament and mutation draws (and the fresh indices
    of its children) must continue from the saved evolution state."""

    def run(max_steps, path, logger=None):
        pop = grpo_population(tiny_model_dir, tokenizer)
        checkpoint = CheckpointConfig(path=path, interval=2, save_async=save_async)
        return finetune_llm_reasoning(
            pop,
            make_env(tokenizer),
            max_steps=max_steps,
            evaluation_interval=2,
            progress=False,
            checkpoint=checkpoint,
            logger=logger,
            **evolution(3),
        )

    straight_pop, straight_history = run(8, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(8, tmp_path / "resumed", logger=StopAfter(5))
    resumed_pop, resumed_history = run(8, tmp_path / "resumed")

    assert comparable(resumed_history) == comparable([row for row in straight_history if row["step"] > 4])
    assert [a.index for a in resumed_pop] == [a.index for a in straight_pop]
    assert [a.fitness for a in resumed_pop] == [a.fitness for a in straight_pop]
    assert [a.lr for a in resumed_pop] == [a.lr for a in straight_pop]
    for resumed, straight in zip(lora_weights(resumed_pop), lora_weights(straight_pop), strict=True):
        for name, tensor in straight.items():
            assert torch.equal(resumed[name], tensor), name
    for resumed, straight in zip(resumed_pop, straight_pop, strict=True):
        assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in straight.optimizer.param_groups]


def test_sft_population_checkpoints_and_evolves(tiny_model_dir, tokenizer, tmp_path):
    train = [{"prompt": f"{i} and {i}", "completion": f"{2 * i}"} for i in range(12)]
    env = SFTGym(train[:8], train[8:], tokenizer, data_batch_size_per_gpu=4, seed=0)
    pop = SFT.population(
        2,
        pad_token_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        hp_config=HyperparameterConfig(lr=RLParameter(min=1e-4, max=1e-2)),
        batch_size=4,
        lr=1e-3,
        gradient_checkpointing=False,
    )
    checkpoint = CheckpointConfig(path=tmp_path / "run", interval=2, keep=1)
    pop, history = finetune_llm_sft(
        pop, env, max_steps=4, evaluation_interval=2, progress=False, checkpoint=checkpoint, **evolution(2)
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["global_step_4", "latest_ckpt_global_step.txt"]
    assert all(len(agent.fitness) == 3 for agent in pop)  # start, step 2 (evolution reuses it), step 4
    assert any(row["step"] == 4.0 and "eval/loss" in row for row in history)


def test_loop_exports_the_fittest_member(tiny_model_dir, tokenizer, tmp_path):
    pop = grpo_population(tiny_model_dir, tokenizer, size=2)
    checkpoint = CheckpointConfig(
        path=tmp_path / "ckpt", interval=2, hf_save_interval=2, export_path=str(tmp_path / "exports")
    )
    pop, _ = finetune_llm_reasoning(
        pop, make_env(tokenizer), max_steps=3, evaluation_interval=1, progress=False, checkpoint=checkpoint
    )
    for step in (2, 3):
        policy = tmp_path / "exports" / f"global_step_{step}" / "policy"
        assert (policy / "model.safetensors").is_file() and (policy / "config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exports" / "global_step_3" / "policy")
    best = max(pop, key=lambda agent: agent.fitness[-1])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = exported(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(best.get_logprobs(ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_loop_argument_checks(tiny_model_dir, tokenizer):
    pop = grpo_population(tiny_model_dir, tokenizer, size=2)
    env = make_env(tokenizer)
    with pytest.raises(ValueError, match="evo_steps needs tournament"):
        finetune_llm_reasoning(pop, env, max_steps=2, evo_steps=1, progress=False)
    with pytest.raises(ValueError, match="without evo_steps"):
        finetune_llm_reasoning(pop, env, max_steps=2, mutation=Mutations(rand_seed=0), progress=False)
    wrong_size = TournamentSelection(tournament_size=2, elitism=True, population_size=3, eval_loop=1)
    with pytest.raises(ValueError, match="population_size is 3 but pop has 2"):
        finetune_llm_reasoning(pop, env, max_steps=2, evo_steps=1, tournament=wrong_size, progress=False)
