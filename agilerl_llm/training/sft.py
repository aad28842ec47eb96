"""``finetune_llm_sft``: the supervised fine-tuning loop (and the offline loop DPO shares).

Each step, every member of the population learns from the same batch of the environment. Every
``evaluation_interval`` steps (and at the end) each member is evaluated on the whole held-out split, so
members are compared on identical data; ``agent.test`` appends the fitness used by evolution.
"""

from __future__ import annotations

import time
from typing import Any

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.checkpoint.run import CheckpointConfig
from agilerl_llm.envs.sft import DatasetServer, SFTGym
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.loop import run_population_loop


def finetune_llm_sft(
    pop: list[LLMAlgorithm],
    env: SFTGym,
    *,
    max_steps: int,
    evaluation_interval: int = 10,
    evaluate_at_start: bool = True,
    logger: MetricsLogger | None = None,
    progress: bool = True,
    checkpoint: CheckpointConfig | None = None,
    evo_steps: int | None = None,
    tournament: Any | None = None,
    mutation: Any | None = None,
) -> tuple[list[LLMAlgorithm], list[dict[str, float]]]:
    """Train a population of ``SFT`` agents on an ``SFTGym``.

    Args:
        pop: the agents (a list of one for plain training; ``SFT.population(size, ...)`` for a population).
        env: serves supervised batches and the held-out split.
        max_steps: optimizer-step batches drawn from the environment.
        evaluation_interval: evaluate every this many steps; the last step is always evaluated.
        evaluate_at_start: evaluate before the first step too.
        logger: where metrics go; by default stdout, one line per step.
        progress: show a progress bar.
        checkpoint, evo_steps, tournament, mutation: run checkpoints and evolution, exactly as in
            ``finetune_llm_reasoning``. The fitness is the held-out metric named by the agent's
            ``fitness_metric``, signed so that higher is better.

    Returns:
        The population and the history: one dict per (step, agent) with ``step``, ``agent``, the training
        metrics and, on evaluation steps, the ``eval/...`` metrics (``eval/loss`` for SFT).
    """
    return run_offline_loop(
        pop,
        env,
        max_steps,
        evaluation_interval,
        evaluate_at_start,
        logger,
        progress,
        checkpoint,
        evo_steps,
        tournament,
        mutation,
    )


def run_offline_loop(
    pop: list[Any],
    env: DatasetServer,
    max_steps: int,
    evaluation_interval: int,
    evaluate_at_start: bool,
    logger: MetricsLogger | None,
    progress: bool,
    checkpoint: CheckpointConfig | None = None,
    evo_steps: int | None = None,
    tournament: Any | None = None,
    mutation: Any | None = None,
) -> tuple[list[Any], list[dict[str, float]]]:
    """The loop of SFT and DPO: batch -> every agent's ``learn`` -> periodic ``evaluate`` on held-out data."""
    return run_population_loop(
        pop,
        env,
        max_steps=max_steps,
        train_step=_learn,
        evaluate=lambda agent: _evaluate(agent, env),
        evaluation_interval=evaluation_interval,
        evaluate_at_start=evaluate_at_start,
        logger=logger,
        progress=progress,
        checkpoint=checkpoint,
        evo_steps=evo_steps,
        tournament=tournament,
        mutation=mutation,
    )


def _learn(agent: Any, batch: Any) -> dict[str, float]:
    started = time.perf_counter()
    metrics = dict(agent.learn(batch))
    metrics["perf/learn_s"] = time.perf_counter() - started
    return metrics


def _evaluate(agent: Any, env: DatasetServer) -> dict[str, float]:
    """Held-out metrics; the agent's fitness (its ``fitness_metric``, signed so higher is better) is recorded."""
    metrics = agent.evaluate(env)
    key, sign = agent.fitness_metric
    agent.fitness.append(sign * metrics[key])
    return metrics
