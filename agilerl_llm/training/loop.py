"""The population loop every finetune function runs: train, evaluate, evolve, checkpoint, export.

One step of the loop, in this order:

1. every member learns from the SAME batch (``train_step``);
2. on evaluation steps (every ``evaluation_interval``, the last step, and every evolution step) every member
   is scored on the whole held-out split (``evaluate``, which appends to ``agent.fitness``), so members are
   compared on identical data;
3. on evolution steps (every ``evo_steps``, except the last step: nothing would train the children) the
   population is selected by tournament and the children are mutated;
4. on checkpoint steps the whole population is saved, with the data position, RNG states and the evolution
   RNG states, so a resumed run makes the same choices an uninterrupted one would;
5. on export steps the fittest member's policy is exported as a merged HuggingFace model.

The reasoning loop (RL, ``training/reasoning.py``) and the offline loop (SFT and DPO, ``training/sft.py``)
differ only in ``train_step`` and ``evaluate``.

Under several processes (``accelerate launch``) every rank runs this loop over the whole population: the env is
sharded so each rank learns from its own slice of every batch, evaluations are reduced so every rank holds the
same fitness, and selection and mutation (seeded alike) make the same choices on every rank, which is checked
after each generation. Metrics are reduced across ranks; only the main process logs, shows progress and writes.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from agilerl_llm.checkpoint.run import CheckpointConfig, CheckpointManager
from agilerl_llm.checkpoint.storage import Store
from agilerl_llm.training.logging import MetricsLogger

EVOLUTION_STATE_KEY = "evolution"


@dataclass
class Evolution:
    """When and how a population evolves: every ``evo_steps`` steps, ``tournament`` then ``mutation``."""

    evo_steps: int
    tournament: Any
    mutation: Any | None = None

    @classmethod
    def from_arguments(
        cls, evo_steps: int | None, tournament: Any | None, mutation: Any | None, pop: list[Any]
    ) -> Evolution | None:
        """Check the finetune functions' evolution arguments together; None when the run does not evolve."""
        if evo_steps is None:
            if tournament is not None or mutation is not None:
                raise ValueError(
                    "tournament / mutation were given without evo_steps; set evo_steps (evolve every N steps) "
                    "or drop them."
                )
            return None
        if not isinstance(evo_steps, int) or evo_steps < 1:
            raise ValueError(f"evo_steps must be a positive int (evolve every N steps), got {evo_steps!r}.")
        if tournament is None:
            raise ValueError("evo_steps needs tournament=TournamentSelection(...) to select the next generation.")
        size = getattr(tournament, "population_size", len(pop))
        if size != len(pop):
            raise ValueError(
                f"tournament.population_size is {size} but pop has {len(pop)} members; build the tournament "
                "with population_size=len(pop)."
            )
        return cls(evo_steps, tournament, mutation)

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.evo_steps == 0 and step < max_steps

    def evolve(self, pop: list[Any]) -> list[Any]:
        """The next generation: tournament selection (elite kept), then mutation of the children."""
        _, pop = self.tournament.select(pop)
        if self.mutation is not None:
            pop = self.mutation.mutation(pop)
        return pop

    def state_dict(self) -> dict[str, Any]:
        state = {"tournament": self.tournament.state_dict()}
        if self.mutation is not None:
            state["mutation"] = self.mutation.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tournament.load_state_dict(state["tournament"])
        if self.mutation is not None and "mutation" in state:
            self.mutation.load_state_dict(state["mutation"])


def run_population_loop(
    pop: list[Any],
    env: Any,
    *,
    max_steps: int,
    train_step: Callable[[Any, Any], dict[str, float]],
    evaluate: Callable[[Any], dict[str, float]],
    evaluation_interval: int,
    evaluate_at_start: bool,
    logger: MetricsLogger | None,
    progress: bool,
    checkpoint: CheckpointConfig | None,
    evo_steps: int | None = None,
    tournament: Any | None = None,
    mutation: Any | None = None,
    before_step: Callable[[list[Any], Any], None] | None = None,
) -> tuple[list[Any], list[dict[str, float]]]:
    """Run the loop described in the module docstring; returns the final population and the metrics history.

    ``train_step(agent, batch)`` returns the step's training metrics; ``evaluate(agent)`` scores the agent on the
    held-out split, appends its fitness to ``agent.fitness`` and returns the ``eval/...`` metrics. ``env`` serves
    batches (``reset(reset_dataloaders=True)``, ``advance()``) and saves its position (``state_dict()``).
    ``evo_steps`` / ``tournament`` / ``mutation`` are the finetune functions' evolution arguments, checked together.
    ``before_step(pop, batch)``, when given, runs before the members' train steps (batched rollouts for all members).
    """
    check_loop_arguments(pop, max_steps, evaluation_interval)
    evolution = Evolution.from_arguments(evo_steps, tournament, mutation, pop)
    dist = pop[0].dist
    if hasattr(env, "shard"):
        env.shard(dist.rank, dist.world_size)
    elif dist.world_size > 1:
        raise ValueError(
            f"{type(env).__name__} has no shard(rank, world_size): under {dist.world_size} processes every rank "
            "would learn from the same data. Give the env a shard method (see agilerl_llm.envs.sharding)."
        )
    if checkpoint is not None and checkpoint.hf_save_interval is not None and dist.zero_stage == 3:
        raise ValueError(
            "checkpoint.hf_save_interval: exporting a merged Hugging Face model during training is not supported "
            "under DeepSpeed ZeRO-3 (the weights are partitioned); drop hf_save_interval / export_path and export a "
            "saved checkpoint afterwards with `agilerl-llm checkpoints export`."
        )
    progress = progress and dist.is_main
    logger = logger or MetricsLogger(print_every=1 if dist.is_main else 0)
    history: list[dict[str, float]] = []
    manager = CheckpointManager(checkpoint, dist_agent=pop[0]) if checkpoint is not None else None
    resumed = manager.restore(pop, env) if manager is not None else None
    start, samples_seen = (resumed.global_step, resumed.samples_seen) if resumed is not None else (0, 0)
    if resumed is not None and evolution is not None:
        saved = resumed.extra.get(EVOLUTION_STATE_KEY)
        if saved is None:
            raise ValueError(
                f"{resumed.path} was saved by a run without evolution; resume it without evo_steps, or start a "
                "new checkpoint path for the evolving run."
            )
        evolution.load_state_dict(saved)
    if resumed is None and evaluate_at_start:
        for agent in pop:
            _record(history, logger, 0, agent, evaluate(agent), dist)
    # A resumed env already stands after the last batch it served: continue with the next one.
    batch = env.advance() if resumed is not None else env.reset(reset_dataloaders=True)
    try:
        for step in tqdm(range(start + 1, max_steps + 1), desc="training", disable=not progress, dynamic_ncols=True):
            evolve = evolution is not None and evolution.due(step, max_steps)
            evaluating = step % evaluation_interval == 0 or step == max_steps or evolve
            if before_step is not None:
                before_step(pop, batch)
            for agent in pop:
                metrics = dist.mean_floats(train_step(agent, batch))  # learn() metrics are global already
                if evaluating:
                    metrics |= evaluate(agent)
                _record(history, logger, step, agent, metrics, dist)
            samples_seen += _batch_size(batch) * dist.world_size
            if evolve:
                if dist.is_main and (progress or logger.print_every):
                    tqdm.write(f"generation at step {step}:\n{fitness_table(pop)}")
                pop = evolution.evolve(pop)
                check_same_population(pop, dist)
            if manager is not None and manager.should_save(step, max_steps):
                extra = {} if evolution is None else {EVOLUTION_STATE_KEY: evolution.state_dict()}
                run_id = getattr(logger, "wandb_run_id", None)
                manager.save(step, pop, env, samples_seen=samples_seen, wandb_run_id=run_id, extra=extra)
            if manager is not None and manager.should_export(step, max_steps):
                export_fittest(pop, checkpoint, step, getattr(env, "tokenizer", None))
            batch = env.advance()
    except BaseException:
        if manager is not None:
            manager.close(raise_error=False)  # finish the write in flight; the loop's own error is the one raised
        raise
    try:
        if manager is not None:
            manager.close()  # an async save completes (or raises) before the loop returns
    finally:
        logger.close()
    return pop, history


def check_loop_arguments(pop: list[Any], max_steps: int, evaluation_interval: int) -> None:
    if not pop:
        raise ValueError("pop is empty; pass a list with at least one agent.")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    if evaluation_interval < 1:
        raise ValueError(f"evaluation_interval must be >= 1, got {evaluation_interval}.")


def _record(
    history: list[dict[str, float]],
    logger: MetricsLogger,
    step: int,
    agent: Any,
    metrics: dict[str, float],
    dist: Any,
) -> None:
    row = {"step": float(step), "agent": float(agent.index)} | hyperparameters(agent) | metrics
    history.append(row)
    if dist.is_main:  # every rank keeps the (identical) history; one writes it out
        logger.log(step, {key: value for key, value in row.items() if key != "step"})


def check_same_population(pop: list[Any], dist: Any) -> None:
    """After a generation, every rank must hold the same members (indices and hyperparameters); selection and
    mutation are seeded alike and read the same fitness, so a difference is a bug that would silently train
    different populations on different ranks."""
    if dist.world_size == 1:
        return
    mine = [(int(agent.index), sorted(hyperparameters(agent).items())) for agent in pop]
    ranks = dist.gather_objects(mine)
    if any(other != ranks[0] for other in ranks):
        raise RuntimeError(f"the ranks' populations diverged after evolution: {ranks}")


def hyperparameters(agent: Any) -> dict[str, float]:
    """``hp/<name>`` for every mutable hyperparameter of ``agent`` (none without an ``hp_config``)."""
    config = getattr(agent, "hp_config", None)
    if config is None:
        return {}
    return {f"hp/{name}": float(getattr(agent, name)) for name in config.names()}


def fitness_of(agent: Any) -> float:
    """The agent's latest fitness (NaN before its first evaluation)."""
    return agent.fitness[-1] if agent.fitness else math.nan


def fittest_first(pop: list[Any]) -> list[Any]:
    """The members sorted by latest fitness, best first; members never evaluated come last (ties keep order)."""
    return sorted(pop, key=lambda agent: -fitness_of(agent) if agent.fitness else math.inf)


def fitness_table(pop: list[Any]) -> str:
    """One line per member: index, mutable hyperparameters, the last mutation and the latest fitness."""
    names = sorted({name for agent in pop for name in hyperparameters(agent)})
    header = ["member", *(name.removeprefix("hp/") for name in names), "mutation", "fitness"]
    rows = []
    for agent in fittest_first(pop):
        values = hyperparameters(agent)
        rows.append(
            [str(agent.index)]
            + [f"{values[name]:.4g}" if name in values else "-" for name in names]
            + [str(getattr(agent, "mut", None) or "-"), f"{fitness_of(agent):.3f}"]
        )
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    )


def export_fittest(pop: list[Any], checkpoint: CheckpointConfig, step: int, tokenizer: Any | None) -> Path | str:
    """Export the member with the best latest fitness (the first member before any evaluation) as a merged
    HuggingFace model at ``<export_path>/global_step_<step>/policy``; returns where it went."""
    from agilerl_llm.checkpoint.export import export_policy

    best = fittest_first(pop)[0]
    store = Store(checkpoint.export_path, checkpoint.storage_options)
    folder = f"global_step_{step}/policy"
    staging = store.staging_dir(folder)
    is_main = best.dist.is_main
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed export left
    best.dist.barrier()
    try:
        export_policy(best, staging, tokenizer)  # every rank calls it; the main process writes
        if is_main:  # config.json (what loaders open first) is the marker: stored last
            store.publish(staging, folder, marker="config.json")
    finally:
        if is_main and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return store.location(folder)


def _batch_size(batch: Any) -> int:
    try:
        return len(batch)
    except TypeError:
        return 0
