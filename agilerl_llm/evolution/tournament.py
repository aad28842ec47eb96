"""``TournamentSelection``: the next generation of a population, by fitness.

A member's fitness is the mean of the last ``eval_loop`` entries of ``agent.fitness`` (appended by
``agent.test``). With ``elitism`` the elite (highest fitness; ties go to the lowest ``index``) is kept
unchanged, the same object with the same index, in slot 0. Every other slot gets the winner of a tournament
of ``tournament_size`` distinct members drawn at random from the current population, as
``winner.clone(index=<fresh index>)``. Fresh indices continue from the highest index ever seen, so an index
names one member for the whole run (logs and checkpoints stay unambiguous).

Members that are not carried over are released with ``clean_up()`` once every clone has been made; the
returned elite is never released, even without elitism (the caller holds it, e.g. to save it). Clones share
the frozen base tensors with their parent (see ``LLMAlgorithm.clone``), so releasing a parent frees its
adapters and optimizer state only.
"""

from __future__ import annotations

import math
from typing import Any

from agilerl_llm.evolution._rng import make_rng, rng_state, set_rng_state


class TournamentSelection:
    """Tournament selection with optional elitism.

    Args:
        tournament_size: members drawn (without replacement) for each tournament; the fittest wins.
        elitism: keep the elite unchanged in slot 0.
        population_size: members of the new population.
        eval_loop: how many of the latest fitness entries are averaged.
        rand_seed: seed of the generator behind every draw; None draws fresh entropy.
    """

    def __init__(
        self,
        tournament_size: int,
        elitism: bool,
        population_size: int,
        eval_loop: int,
        rand_seed: int | None = None,
    ) -> None:
        for name, value in {
            "tournament_size": tournament_size,
            "population_size": population_size,
            "eval_loop": eval_loop,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self.tournament_size = tournament_size
        self.elitism = bool(elitism)
        self.population_size = population_size
        self.eval_loop = eval_loop
        self.rand_seed = rand_seed
        self.rng = make_rng(rand_seed)
        self.max_index = -1  # the highest index seen so far; new members get max_index + 1, ...

    def fitness(self, agent: Any) -> float:
        """Mean of the last ``eval_loop`` fitness entries of ``agent``."""
        recent = list(agent.fitness)[-self.eval_loop :]
        if not recent:
            raise ValueError(
                f"Agent index {agent.index} has no fitness: evaluate before selecting (agent.test(env) appends it)."
            )
        value = float(sum(recent) / len(recent))
        if math.isnan(value):
            raise ValueError(f"Agent index {agent.index} has a NaN fitness {recent}; evaluate it again.")
        return value

    def _fittest(self, members: list[Any], scores: dict[int, float]) -> Any:
        # Highest fitness; ties go to the lowest index.
        return max(members, key=lambda agent: (scores[id(agent)], -agent.index))

    def select(self, population: list[Any]) -> tuple[Any, list[Any]]:
        """The elite and the next population (``population_size`` members).

        Raises:
            ValueError: for an empty population, a member without fitness, or a tournament larger than the
                population.
        """
        if not population:
            raise ValueError("select() needs a non-empty population.")
        if self.tournament_size > len(population):
            raise ValueError(
                f"tournament_size={self.tournament_size} is larger than the population ({len(population)} members)."
            )
        scores = {id(agent): self.fitness(agent) for agent in population}
        self.max_index = max(self.max_index, *(agent.index for agent in population))
        elite = self._fittest(population, scores)

        new_population = [elite] if self.elitism else []
        while len(new_population) < self.population_size:
            drawn = self.rng.choice(len(population), size=self.tournament_size, replace=False)
            winner = self._fittest([population[int(i)] for i in drawn], scores)
            self.max_index += 1
            new_population.append(winner.clone(index=self.max_index))

        keep = {id(agent) for agent in new_population} | {id(elite)}
        for agent in population:
            if id(agent) not in keep:
                agent.clean_up()
        return elite, new_population

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-able state: the settings, the highest index handed out and the generator's state."""
        return {
            "tournament_size": self.tournament_size,
            "elitism": self.elitism,
            "population_size": self.population_size,
            "eval_loop": self.eval_loop,
            "rand_seed": self.rand_seed,
            "max_index": self.max_index,
            "rng": rng_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator and the index counter saved by ``state_dict``."""
        set_rng_state(self.rng, state["rng"])
        self.max_index = int(state["max_index"])
