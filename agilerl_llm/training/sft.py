"""``finetune_llm_sft``: the supervised fine-tuning loop (and the offline loop DPO shares).

Each step, every member of the population learns from the same batch of the environment. Every
``evaluation_interval`` steps (and at the end) each member is evaluated on the whole held-out split, so
members are compared on identical data; ``agent.test`` appends the fitness used by evolution.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.envs.sft import DatasetServer, SFTGym
from agilerl_llm.training.logging import MetricsLogger


def finetune_llm_sft(
    pop: list[LLMAlgorithm],
    env: SFTGym,
    *,
    max_steps: int,
    evaluation_interval: int = 10,
    evaluate_at_start: bool = True,
    logger: MetricsLogger | None = None,
    progress: bool = True,
) -> tuple[list[LLMAlgorithm], list[dict[str, float]]]:
    """Train a population of ``SFT`` agents on an ``SFTGym``.

    Args:
        pop: the agents (a list of one for plain training).
        env: serves supervised batches and the held-out split.
        max_steps: optimizer-step batches drawn from the environment.
        evaluation_interval: evaluate every this many steps; the last step is always evaluated.
        evaluate_at_start: evaluate before the first step too.
        logger: where metrics go; by default stdout, one line per step.
        progress: show a progress bar.

    Returns:
        The population and the history: one dict per (step, agent) with ``step``, ``agent``, the training
        metrics and, on evaluation steps, the ``eval/...`` metrics (``eval/loss`` for SFT).
    """
    return run_offline_loop(pop, env, max_steps, evaluation_interval, evaluate_at_start, logger, progress)


def run_offline_loop(
    pop: list[Any],
    env: DatasetServer,
    max_steps: int,
    evaluation_interval: int,
    evaluate_at_start: bool,
    logger: MetricsLogger | None,
    progress: bool,
) -> tuple[list[Any], list[dict[str, float]]]:
    """The loop of SFT and DPO: batch -> every agent's ``learn`` -> periodic ``evaluate`` on held-out data."""
    if not pop:
        raise ValueError("pop is empty; pass a list with at least one agent.")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    if evaluation_interval < 1:
        raise ValueError(f"evaluation_interval must be >= 1, got {evaluation_interval}.")
    logger = logger or MetricsLogger()
    history: list[dict[str, float]] = []
    if evaluate_at_start:
        for agent in pop:
            row = {"step": 0.0, "agent": float(agent.index)} | _evaluate(agent, env)
            history.append(row)
            logger.log(0, {key: value for key, value in row.items() if key != "step"})
    batch = env.reset(reset_dataloaders=True)
    for step in tqdm(range(1, max_steps + 1), desc="training", disable=not progress, dynamic_ncols=True):
        for agent in pop:
            started = time.perf_counter()
            row = {"step": float(step), "agent": float(agent.index)} | agent.learn(batch)
            row["perf/learn_s"] = time.perf_counter() - started
            if step % evaluation_interval == 0 or step == max_steps:
                row |= _evaluate(agent, env)
            history.append(row)
            logger.log(step, {key: value for key, value in row.items() if key != "step"})
        batch = env.advance()
    logger.close()
    return pop, history


def _evaluate(agent: Any, env: DatasetServer) -> dict[str, float]:
    """Held-out metrics; the agent's fitness (its ``fitness_metric``, signed so higher is better) is recorded."""
    metrics = agent.evaluate(env)
    key, sign = agent.fitness_metric
    agent.fitness.append(sign * metrics[key])
    return metrics
