"""``finetune_llm_preference``: the DPO training loop on a ``PreferenceGym``.

Each step, every member of the population learns from the same batch of preference pairs; every
``evaluation_interval`` steps (and at the end) each member's held-out reward accuracy is measured on the
whole test split and recorded as its fitness. The loop itself is shared with SFT (``run_offline_loop``).
"""

from __future__ import annotations

from typing import Any

from agilerl_llm.algorithms.dpo import DPO
from agilerl_llm.checkpoint.run import CheckpointConfig
from agilerl_llm.envs.preference import PreferenceGym
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.sft import run_offline_loop


def finetune_llm_preference(
    pop: list[DPO],
    env: PreferenceGym,
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
) -> tuple[list[DPO], list[dict[str, float]]]:
    """Train a population of ``DPO`` agents on preference pairs.

    Args:
        pop: the agents (a list of one for plain training).
        env: serves preference batches and the held-out pairs.
        max_steps: batches drawn from the environment (each is one ``learn`` call).
        evaluation_interval: evaluate every this many steps; the last step is always evaluated.
        evaluate_at_start: evaluate before the first step too.
        logger: where metrics go; by default stdout, one line per step.
        progress: show a progress bar.
        checkpoint, evo_steps, tournament, mutation: run checkpoints and evolution, exactly as in
            ``finetune_llm_reasoning``; the fitness is the held-out reward accuracy.

    Returns:
        The population and the history: one dict per (step, agent) with ``step``, ``agent``, the training
        metrics and, on evaluation steps, ``eval/loss``, ``eval/accuracy`` and ``eval/margin``.
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
