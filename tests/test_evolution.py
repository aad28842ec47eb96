"""Evolution: hyperparameter ranges, mutation, tournament selection and populations on one shared base."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from agilerl_llm import DPO, GRPO, LLMPPO
from agilerl_llm.evolution import HyperparameterConfig, Mutations, RLParameter, TournamentSelection, create_population
from agilerl_llm.optim import CosineLRScheduleConfig, build_lr_scheduler

HP = HyperparameterConfig(
    lr=RLParameter(min=1e-5, max=1e-2),
    beta=RLParameter(min=0.0, max=0.1),
    clip_coef=RLParameter(min=0.05, max=0.4),
    temperature=RLParameter(min=0.3, max=1.2),
    group_size=RLParameter(min=2, max=16, dtype=int),
    update_epochs=RLParameter(min=1, max=4, dtype=int),
)


def grpo_kwargs(tiny_model_dir, tokenizer, **overrides):
    kwargs = dict(
        pad_token_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        group_size=4,
        batch_size=4,
        lr=1e-3,
        gradient_checkpointing=False,
        hp_config=HP,
    )
    return kwargs | overrides


def make_population(tiny_model_dir, tokenizer, size=3, **overrides):
    return create_population(GRPO, size, **grpo_kwargs(tiny_model_dir, tokenizer, **overrides))


def learning_step(agent: GRPO) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 16), generator=generator)
    action_mask = torch.zeros(4, 15, dtype=torch.long)
    action_mask[:, 6:] = 1
    agent.learn((ids, action_mask, torch.tensor([[0.0, 1.0, 0.5, 0.2]])))


def lora_snapshot(agent, adapter="actor") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.actor.named_parameters() if f".{adapter}." in n}


def base_snapshot(agent) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.actor.named_parameters() if "lora_" not in n}


def hyperparameters(agent) -> dict[str, float]:
    return {name: getattr(agent, name) for name in HP}


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("parameter", "message"),
    [
        (RLParameter(min=1.0, max=0.5), "greater than max"),
        (RLParameter(min=float("nan"), max=1.0), "finite"),
        (RLParameter(min=0.0, max=float("inf")), "finite"),
        (RLParameter(min=0.0, max=1.0, grow_factor=1.0), "grow_factor"),
        (RLParameter(min=0.0, max=1.0, shrink_factor=1.0), "shrink_factor"),
        (RLParameter(min=0.0, max=1.0, shrink_factor=0.0), "shrink_factor"),
        (RLParameter(min=1.5, max=4, dtype=int), "integer bounds"),
        (RLParameter(min=0.0, max=1.0, dtype="complex"), "dtype"),
    ],
)
def test_invalid_ranges_fail_naming_the_field(parameter, message):
    with pytest.raises(ValueError, match=f"'my_field'.*{message}"):
        HyperparameterConfig(lr=RLParameter(1e-5, 1e-2), my_field=parameter)


def test_config_accepts_plain_dicts_and_round_trips():
    config = HyperparameterConfig(group_size={"min": 2, "max": 8, "dtype": "int"})
    assert config["group_size"].type is int and list(config) == ["group_size"]
    assert HyperparameterConfig(**json.loads(json.dumps(HP.to_dict()))).to_dict() == HP.to_dict()
    with pytest.raises(ValueError, match="'beta'"):
        HyperparameterConfig(beta=0.1)


def test_int_mutation_moves_small_values_and_stays_in_range():
    parameter = RLParameter(min=1, max=4, dtype=int)
    assert parameter.mutate(1, grow=True) == 2  # 1 * 1.2 rounds back to 1: step by one instead
    assert parameter.mutate(1, grow=False) == 1  # clipped at min
    assert parameter.mutate(4, grow=True) == 4  # clipped at max
    assert isinstance(parameter.mutate(3, grow=False), int)


@pytest.mark.parametrize(
    ("algorithm", "name", "parameter", "message"),
    [
        (DPO, "group_size", RLParameter(2, 8, dtype=int), "'group_size', which is not a hyperparameter of DPO"),
        (GRPO, "no_such_thing", RLParameter(0.0, 1.0), "'no_such_thing', which is not a hyperparameter of GRPO"),
        (GRPO, "lr", RLParameter(1e-2, 1e-1), r"GRPO.lr=0.001 lies outside"),
        (GRPO, "whiten_advantages", RLParameter(0, 1, dtype=int), "only int and float"),
        (GRPO, "lr", RLParameter(0.0, 1e-1), "learning rate: min must be > 0"),
        (GRPO, "temperature", RLParameter(0, 2, dtype=int), "dtype=int"),
    ],
)
def test_hp_config_names_are_checked_against_the_algorithm(
    tiny_model_dir, tokenizer, algorithm, name, parameter, message
):
    kwargs = grpo_kwargs(tiny_model_dir, tokenizer, hp_config=HyperparameterConfig(**{name: parameter}))
    if algorithm is DPO:
        for key in ("group_size",):
            kwargs.pop(key)
    with pytest.raises(ValueError, match=message):
        algorithm(**kwargs)


def test_tuple_clip_coef_cannot_be_mutated(tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="clip_coef"):
        GRPO(**grpo_kwargs(tiny_model_dir, tokenizer, clip_coef=(0.2, 0.28)))


# ---------------------------------------------------------------------------------------------- mutation
def test_mutation_stays_in_range_and_is_reproducible(tiny_model_dir, tokenizer):
    def trace(seed: int, rounds: int = 40) -> list:
        population = make_population(tiny_model_dir, tokenizer)
        mutations = Mutations(no_mutation=0.2, rl_hp=0.8, rand_seed=seed)
        steps = []
        for _ in range(rounds):
            assert mutations.mutation(population) is population
            for agent in population:
                values = hyperparameters(agent)
                for name, value in values.items():
                    assert HP[name].contains(value), (name, value)
                    assert isinstance(value, HP[name].type), (name, value)
                assert all(group["lr"] == agent.lr for group in agent.optimizer.param_groups)
                steps.append((agent.index, agent.mut, values))
        return steps

    first, again, other = trace(1), trace(1), trace(2)
    assert first == again
    assert first != other
    kinds = {mut for _, mut, _ in first}
    assert "None" in kinds and set(HP) <= kinds, kinds  # every hyperparameter and no-mutation occurred


def test_mutated_lr_reaches_every_param_group_and_the_schedule(tiny_model_dir, tokenizer):
    schedule = CosineLRScheduleConfig(num_epochs=10, warmup_proportion=0.0)
    agent = GRPO(
        **grpo_kwargs(
            tiny_model_dir,
            tokenizer,
            cosine_lr_schedule_config=schedule,
            hp_config=HyperparameterConfig(lr=RLParameter(1e-5, 1e-1)),
        )
    )
    # Two param groups, as an optimizer with several groups would have.
    parameters = agent.adapters.trainable_parameters()
    half = len(parameters) // 2
    agent.optimizer = torch.optim.AdamW([{"params": parameters[:half]}, {"params": parameters[half:]}], lr=agent.lr)
    agent.lr_scheduler = build_lr_scheduler(agent.optimizer, schedule)
    learning_step(agent)  # the schedule is now at step 1
    factor = agent.lr_scheduler.lr_lambdas[0]
    Mutations(no_mutation=0.0, rl_hp=1.0, rand_seed=3).mutation([agent])
    assert agent.mut == "lr" and agent.lr != 1e-3
    for group in agent.optimizer.param_groups:
        assert group["initial_lr"] == agent.lr
        assert math.isclose(group["lr"], agent.lr * factor(1), rel_tol=1e-12)
    learning_step(agent)  # the next scheduler step scales the new peak
    for group in agent.optimizer.param_groups:
        assert math.isclose(group["lr"], agent.lr * factor(2), rel_tol=1e-12)
    assert math.isclose(agent.lr_scheduler.get_last_lr()[0], agent.lr * factor(2), rel_tol=1e-12)


def test_mutation_hooks_run_and_clones_inherit_them(tiny_model_dir, tokenizer):
    calls = []
    first = GRPO(**grpo_kwargs(tiny_model_dir, tokenizer))
    first.register_mutation_hook(lambda: calls.append("hook"))
    population = [first, first.clone(index=1)]
    Mutations(no_mutation=1.0, rl_hp=0.0, rand_seed=0).mutation(population)
    assert calls == [] and [a.mut for a in population] == ["None", "None"]
    Mutations(no_mutation=0.0, rl_hp=1.0, rand_seed=0).mutation(population)
    assert calls == ["hook", "hook"] and all(a.mut in HP for a in population)
    Mutations(no_mutation=0.0, rl_hp=1.0, rand_seed=0, mutate_elite=False).mutation(population)
    assert len(calls) == 3 and population[0].mut == "None"


def test_nothing_to_mutate_is_an_error(tiny_model_dir, tokenizer):
    for hp_config in (None, HyperparameterConfig()):
        agent = GRPO(**grpo_kwargs(tiny_model_dir, tokenizer, hp_config=hp_config))
        with pytest.raises(ValueError, match="no hyperparameters to mutate"):
            Mutations(no_mutation=0.0, rl_hp=1.0).mutation([agent])
        Mutations(no_mutation=1.0, rl_hp=0.0).mutation([agent])  # no hyperparameter mutation: fine


def test_mutations_arguments_are_checked():
    with pytest.raises(ValueError, match="architecture"):
        Mutations(architecture=0.2)
    with pytest.raises(ValueError, match="rl_hp"):
        Mutations(rl_hp=-1.0)
    with pytest.raises(ValueError, match="no_mutation"):
        Mutations(no_mutation=0.0, rl_hp=0.0)
    mutations = Mutations(no_mutation=1.0, rl_hp=3.0)
    assert (mutations.no_mutation, mutations.rl_hp) == (0.25, 0.75)


def test_mutations_state_dict_reproduces_the_next_choices(tiny_model_dir, tokenizer):
    mutations = Mutations(no_mutation=0.3, rl_hp=0.7, rand_seed=11)
    mutations.mutation(make_population(tiny_model_dir, tokenizer))
    state = json.loads(json.dumps(mutations.state_dict()))
    expected = [(a.mut, hyperparameters(a)) for a in mutations.mutation(make_population(tiny_model_dir, tokenizer))]
    resumed = Mutations(no_mutation=0.3, rl_hp=0.7, rand_seed=999)
    resumed.load_state_dict(state)
    got = [(a.mut, hyperparameters(a)) for a in resumed.mutation(make_population(tiny_model_dir, tokenizer))]
    assert got == expected


# ---------------------------------------------------------------------------------------------- tournament
def distinct_population(tiny_model_dir, tokenizer, fitness, size=4):
    """Members with distinct actor adapters (tagged by their own index) and the given fitness lists."""
    population = make_population(tiny_model_dir, tokenizer, size=size)
    with torch.no_grad():
        for agent, scores in zip(population, fitness, strict=True):
            for parameter in agent.adapters.parameters("actor"):
                parameter.fill_(float(agent.index))
            agent.tag = agent.index  # plain attribute: clones carry their parent's tag
            agent.fitness = list(scores)
    return population


def test_tournament_keeps_the_elite_and_only_clones_existing_members(tiny_model_dir, tokenizer):
    population = distinct_population(tiny_model_dir, tokenizer, [[0.0, 0.1], [0.5, 0.9], [0.2, 0.5], [0.9, 0.9]])
    old = list(population)
    tournament = TournamentSelection(tournament_size=2, elitism=True, population_size=4, eval_loop=1, rand_seed=1)
    elite, new_population = tournament.select(population)
    # Fitness is the last eval_loop=1 entry: members 1 and 3 tie at 0.9, the lower index wins.
    assert elite is old[1] and new_population[0] is elite and elite.index == 1
    assert [a.index for a in new_population[1:]] == [4, 5, 6]
    for agent in new_population[1:]:
        assert agent not in old
        assert agent.tag in {0, 1, 2, 3}
        assert all(torch.all(p == agent.tag) for p in agent.adapters.parameters("actor"))
        assert agent.tag != 0  # the weakest member loses every tournament it is drawn into
    # Members not carried over are released; the elite is untouched.
    assert all("actor" not in vars(agent) for agent in old if agent is not elite)
    assert all(torch.all(p == 1.0) for p in elite.adapters.parameters("actor"))

    for agent in new_population:
        agent.fitness.append(float(agent.index))
    _, third = tournament.select(new_population)
    assert third[0].index == 6 and [a.index for a in third[1:]] == [7, 8, 9]


def test_tournament_without_elitism_and_with_eval_loop(tiny_model_dir, tokenizer):
    population = distinct_population(tiny_model_dir, tokenizer, [[1.0, 0.0], [0.0, 0.6], [0.4, 0.4]], size=3)
    old = list(population)
    tournament = TournamentSelection(tournament_size=3, elitism=False, population_size=2, eval_loop=2, rand_seed=0)
    elite, new_population = tournament.select(population)
    assert elite is old[0]  # mean of the last two: 0.5, 0.3, 0.4
    assert len(new_population) == 2 and all(a not in old for a in new_population)
    assert [a.tag for a in new_population] == [0, 0] and [a.index for a in new_population] == [3, 4]
    assert "actor" in vars(elite)  # the returned elite is not released
    assert "actor" not in vars(old[1]) and "actor" not in vars(old[2])


def test_tournament_errors(tiny_model_dir, tokenizer):
    population = distinct_population(tiny_model_dir, tokenizer, [[0.1], []], size=2)
    with pytest.raises(ValueError, match="evaluate before selecting"):
        TournamentSelection(2, True, 2, 1, rand_seed=0).select(population)
    with pytest.raises(ValueError, match="tournament_size"):
        TournamentSelection(3, True, 2, 1).select(population)
    with pytest.raises(ValueError, match="eval_loop"):
        TournamentSelection(2, True, 2, 0)


def test_tournament_state_dict_reproduces_the_next_choices(tiny_model_dir, tokenizer):
    fitness = [[0.3], [0.1], [0.2], [0.25]]
    tournament = TournamentSelection(2, True, 4, 1, rand_seed=5)
    tournament.select(distinct_population(tiny_model_dir, tokenizer, fitness))
    state = json.loads(json.dumps(tournament.state_dict()))
    _, expected = tournament.select(distinct_population(tiny_model_dir, tokenizer, fitness))
    resumed = TournamentSelection(2, True, 4, 1, rand_seed=123)
    resumed.load_state_dict(state)
    _, got = resumed.select(distinct_population(tiny_model_dir, tokenizer, fitness))
    assert [(a.tag, a.index) for a in got] == [(a.tag, a.index) for a in expected]
    assert [a.index for a in got] == [0, 7, 8, 9]  # indices continue after the first selection's 4..6


# ---------------------------------------------------------------------------------------------- population
def test_population_shares_the_base_and_owns_its_adapters(tiny_model_dir, tokenizer):
    population = GRPO.population(3, **grpo_kwargs(tiny_model_dir, tokenizer))
    assert [a.index for a in population] == [0, 1, 2]
    assert all(a.hp_config is HP for a in population)
    named = [dict(a.actor.named_parameters()) for a in population]
    for name in named[0]:
        pointers = {members[name].data_ptr() for members in named}
        if ".reference." in name:  # frozen: one copy for the population until a member's reference moves
            assert len(pointers) == 1, f"reference weight {name} is stored more than once"
        elif "lora_" in name:
            assert len(pointers) == 3, f"{name} is shared between members"
        else:
            assert len(pointers) == 1, f"base weight {name} is stored more than once"
    assert len({id(a.optimizer) for a in population}) == 3

    adapters = [lora_snapshot(a) | lora_snapshot(a, "reference") for a in population]
    base = base_snapshot(population[0])
    learning_step(population[1])
    assert population[1].optimizer.state and not population[0].optimizer.state
    changed = lora_snapshot(population[1])
    assert any(not torch.equal(changed[n], adapters[1][n]) for n in changed)
    for other in (0, 2):
        now = lora_snapshot(population[other]) | lora_snapshot(population[other], "reference")
        assert all(torch.equal(now[n], adapters[other][n]) for n in now), f"member {other} changed"
    for agent in population:
        assert all(torch.equal(p, base[n]) for n, p in base_snapshot(agent).items()), "the base changed"


def test_ppo_population_members_own_their_critic_and_value_head(tiny_model_dir, tokenizer):
    population = create_population(
        LLMPPO,
        2,
        pad_token_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        actor_network=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        gradient_checkpointing=False,
        hp_config=HyperparameterConfig(vf_coef=RLParameter(0.1, 1.0), gae_lambda=RLParameter(0.8, 1.0)),
    )
    first, second = population
    assert first.value_head is not second.value_head
    for a, b in zip(first.value_head.parameters(), second.value_head.parameters(), strict=True):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    critic_a, critic_b = first.adapters.parameters("critic"), second.adapters.parameters("critic")
    assert critic_a and all(a.data_ptr() != b.data_ptr() for a, b in zip(critic_a, critic_b, strict=True))
    Mutations(no_mutation=0.0, rl_hp=1.0, rand_seed=0).mutation(population)
    assert all(a.mut in ("vf_coef", "gae_lambda") for a in population)


def test_create_population_arguments(tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="size"):
        create_population(GRPO, 0, **grpo_kwargs(tiny_model_dir, tokenizer))
    with pytest.raises(ValueError, match="index"):
        create_population(GRPO, 2, index=3, **grpo_kwargs(tiny_model_dir, tokenizer))


# ---------------------------------------------------------------------------------------------- benchmark
def test_population_memory_benchmark_smoke_run(tmp_path):
    """benchmarks/population_memory.py on the nano model: one table row per size, the target line, the JSON."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "population_memory.py"
    out = tmp_path / "memory.json"
    result = subprocess.run(
        [sys.executable, str(script), "--model-size", "nano", "--sizes", "1", "2", "--naive-sizes", "1"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,  # ~25 s on a quiet 2-core machine: three fresh interpreters import torch
        check=False,
        env=os.environ | {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("members |") and "shared-base RSS MB" in line for line in lines)
    rows = [line for line in lines if line.split("|")[0].strip() in ("1", "2")]
    assert len(rows) == 2
    assert any(line.startswith("2 members:") and "target <= 1.25x" in line for line in lines)
    results = json.loads(out.read_text())
    shared, naive = results["shared"], results["naive"]
    assert set(shared) == {"1", "2"} and set(naive) == {"1"}
    # Two shared members store the base once, and the frozen reference adapter once: one member's tensors are its
    # actor, reference and the actor's two AdamW moments (a reference is a quarter), two members hold one
    # reference fewer than twice that.
    assert shared["2"]["base_tensor_mb"] == shared["1"]["base_tensor_mb"] > 0
    one, two = shared["1"]["member_tensor_mb"], shared["2"]["member_tensor_mb"]
    assert math.isclose(2 * one - two, one / 4, rel_tol=0.01)
    assert all(row["rss_mb"] > row["runtime_mb"] > 0 for row in [*shared.values(), *naive.values()])
