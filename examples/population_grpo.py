"""Evolve a population of 4 GRPO agents on one shared tiny base model, on the CPU, in a few minutes.

    python examples/population_grpo.py                          # configs/population.yaml (about 4 minutes)
    python examples/population_grpo.py training.max_steps=20 evolution.evo_steps=5   # any dotted override

The run is ``configs/population.yaml``: a tiny model built in code gets the quickstart's warm start, then four
GRPO members, each with its own LoRA adapters and optimizer over the SAME frozen base tensors, train on
"reverse the letters". Every ``evo_steps`` steps all members are scored on the same held-out prompts (greedy,
exact match), a tournament with elitism picks the parents of the next generation, and each child may have its
lr or sampling temperature perturbed. The loop prints each generation's fitness table; at the end this script
prints a table of the fitness of every member at every evaluation and saves a plot of fitness over generations
as ``<output_dir>/fitness.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from agilerl_llm.training.config import RunConfig
from agilerl_llm.training.job import run_reasoning_job
from agilerl_llm.training.loop import fitness_table

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "population.yaml"


def fitness_by_step(history: list[dict[str, float]]) -> dict[int, dict[int, float]]:
    """{step: {member index: held-out reward}} for every evaluation in the history."""
    table: dict[int, dict[int, float]] = defaultdict(dict)
    for row in history:
        if "eval/reward" in row:
            table[int(row["step"])][int(row["agent"])] = row["eval/reward"]
    return dict(sorted(table.items()))


def generations_table(fitness: dict[int, dict[int, float]]) -> str:
    """One line per evaluation step: the best, mean and each member's fitness."""
    lines = [f"{'step':>5}  {'best':>6}  {'mean':>6}  members (index: fitness)"]
    for step, members in fitness.items():
        scores = list(members.values())
        listed = "  ".join(f"{index}: {score:.3f}" for index, score in sorted(members.items()))
        lines.append(f"{step:>5}  {max(scores):>6.3f}  {sum(scores) / len(scores):>6.3f}  {listed}")
    return "\n".join(lines)


def plot_fitness(fitness: dict[int, dict[int, float]], path: Path) -> Path:
    """Save the population's best, mean and per-member fitness over the evaluation steps as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = list(fitness)
    figure, axes = plt.subplots(figsize=(7, 4))
    members: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for step, scores in fitness.items():
        for index, score in scores.items():
            members[index].append((step, score))
    for points in members.values():
        axes.plot(*zip(*points, strict=True), color="0.75", marker=".", linewidth=1)
    axes.plot(steps, [max(s.values()) for s in fitness.values()], color="C0", marker="o", label="best member")
    axes.plot(steps, [sum(s.values()) / len(s) for s in fitness.values()], color="C1", marker="o", label="mean")
    axes.set_xlabel("training step (a new generation after each evaluation)")
    axes.set_ylabel("held-out exact-match reward")
    axes.set_title("GRPO population fitness (grey: individual members)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="a run config with an evolution section")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.max_steps=20")
    args = parser.parse_args(argv)
    config = RunConfig.from_yaml(args.config, args.overrides)
    if config.evolution is None:
        parser.error(f"{args.config} has no evolution section; this example evolves a population.")
    result = run_reasoning_job(config)
    fitness = fitness_by_step(result.history)
    print("\nfinal population (fittest first):")
    print(fitness_table(result.population))
    print("\nheld-out reward of every member at every evaluation:")
    print(generations_table(fitness))
    plot = plot_fitness(fitness, Path(config.output_dir) / "fitness.png")
    best = result.population[0]
    print(
        f"\nbest member {best.index}: held-out reward {result.reward_before:.3f} -> {result.reward_after:.3f}, "
        f"exact answers {result.exact_before:.3f} -> {result.exact_after:.3f}; {result.seconds:.0f} s; plot: {plot}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
