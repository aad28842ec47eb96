"""``Mutations``: random perturbation of the RL hyperparameters of a population's members.

For each member, with probability ``no_mutation`` nothing happens (``agent.mut = "None"``); otherwise
(``rl_hp``) one hyperparameter of the member's ``hp_config`` is picked uniformly and multiplied by its grow or
shrink factor (even odds), clipped to its range and cast to its dtype (``agent.mut`` = its name). A mutated
learning rate is pushed into the optimizer (every param group, and the LR schedule's peak) so it takes
effect at the next step. After a hyperparameter mutation the member's ``mutation_hook()`` runs.

Network mutations of AgileRL's ``Mutations`` (architecture, new layers, parameter noise, activations) do
not apply to LoRA adapters on a frozen base: their probabilities are accepted for API compatibility and
must be 0.

All choices come from one seeded generator owned by the ``Mutations`` object: the same seed and the same
population give the same mutations, and ``state_dict`` / ``load_state_dict`` carry the generator between a
run and its resumption.
"""

from __future__ import annotations

import math
from typing import Any

from agilerl_llm.evolution._rng import make_rng, rng_state, set_rng_state

NO_MUTATION = "None"


class Mutations:
    """Hyperparameter mutation of LLM agents.

    Args:
        no_mutation: relative probability of leaving a member unchanged.
        rl_hp: relative probability of mutating one RL hyperparameter. The two are normalised to sum to 1.
        mutation_sd: standard deviation of parameter-noise mutations. Kept for AgileRL API compatibility:
            no mutation performed here uses it (hyperparameters move by their grow/shrink factors).
        rand_seed: seed of the generator behind every choice; None draws fresh entropy.
        mutate_elite: when False, the first member of the population (the elite kept by
            ``TournamentSelection(elitism=True)``) is never mutated.
        architecture, new_layer_prob, parameters, activation: AgileRL's network mutations; must be 0.
    """

    def __init__(
        self,
        no_mutation: float = 0.4,
        rl_hp: float = 0.6,
        mutation_sd: float = 0.1,
        rand_seed: int | None = None,
        mutate_elite: bool = True,
        architecture: float = 0.0,
        new_layer_prob: float = 0.0,
        parameters: float = 0.0,
        activation: float = 0.0,
    ) -> None:
        network = {
            "architecture": architecture,
            "new_layer_prob": new_layer_prob,
            "parameters": parameters,
            "activation": activation,
        }
        for name, value in network.items():
            _check_probability(name, value)
            if value != 0:
                raise ValueError(
                    f"{name}={value!r}: network mutations do not apply to LoRA adapters on a frozen base model; "
                    "use no_mutation and rl_hp only."
                )
        _check_probability("no_mutation", no_mutation)
        _check_probability("rl_hp", rl_hp)
        if no_mutation + rl_hp <= 0:
            raise ValueError("no_mutation + rl_hp must be > 0 (they are relative probabilities).")
        if not math.isfinite(mutation_sd) or mutation_sd < 0:
            raise ValueError(f"mutation_sd must be a finite number >= 0, got {mutation_sd!r}.")
        total = no_mutation + rl_hp
        self.no_mutation = no_mutation / total
        self.rl_hp = rl_hp / total
        self.mutation_sd = mutation_sd
        self.rand_seed = rand_seed
        self.mutate_elite = mutate_elite
        self.rng = make_rng(rand_seed)

    # ------------------------------------------------------------------------------------------ mutation
    def mutation(self, population: list[Any], pre_training_mut: bool = False) -> list[Any]:
        """Mutate the members of ``population`` in place and return the same list.

        Args:
            population: the agents; each records what happened to it in ``agent.mut``.
            pre_training_mut: accepted for AgileRL compatibility; it changes nothing here (no mutation
                needs the training loop's state).
        """
        for position, agent in enumerate(population):
            if position == 0 and not self.mutate_elite:
                agent.mut = NO_MUTATION
                continue
            kind = self.rng.choice(2, p=[self.no_mutation, self.rl_hp])
            if kind == 0:
                agent.mut = NO_MUTATION
            else:
                self.rl_hyperparam_mutation(agent)
        return population

    def rl_hyperparam_mutation(self, agent: Any) -> Any:
        """Perturb one hyperparameter of ``agent`` (picked uniformly from its ``hp_config``); returns the agent.

        Raises:
            ValueError: when the agent has no hyperparameters to mutate (``hp_config`` None or empty).
        """
        hp_config = getattr(agent, "hp_config", None)
        if not hp_config:
            raise ValueError(
                f"{type(agent).__name__} (index {agent.index}) has no hyperparameters to mutate: build the population "
                "with hp_config=HyperparameterConfig(...) or use Mutations(rl_hp=0)."
            )
        names = list(hp_config)
        name = names[int(self.rng.integers(len(names)))]
        grow = bool(self.rng.integers(2))
        new_value = hp_config[name].mutate(getattr(agent, name), grow)
        setattr(agent, name, new_value)
        if name in agent.get_lr_names():
            agent.update_lr(agent.optimizer, new_value)
        agent.mut = name
        agent.mutation_hook()
        return agent

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-able state: the probabilities and the generator's state."""
        return {
            "no_mutation": self.no_mutation,
            "rl_hp": self.rl_hp,
            "mutation_sd": self.mutation_sd,
            "rand_seed": self.rand_seed,
            "mutate_elite": self.mutate_elite,
            "rng": rng_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator saved by ``state_dict`` (the settings stay those of this object)."""
        set_rng_state(self.rng, state["rng"])


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
