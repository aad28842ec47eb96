"""``finetune_llm_reasoning``: the RL training loop for reasoning environments.

Each step, every member of the population samples completions for the same prompt batch, the
environment scores them, and the member learns from its own rollouts. Every ``evaluation_interval``
steps (and at the end) each member is evaluated on the whole held-out split with greedy decoding, so
members are compared on identical prompts.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.checkpoint.run import CheckpointConfig, CheckpointManager
from agilerl_llm.envs.reasoning import ReasoningGym
from agilerl_llm.training.logging import MetricsLogger


def finetune_llm_reasoning(
    pop: list[LLMAlgorithm],
    env: ReasoningGym,
    *,
    max_steps: int,
    evaluation_interval: int = 10,
    evaluate_at_start: bool = True,
    logger: MetricsLogger | None = None,
    progress: bool = True,
    checkpoint: CheckpointConfig | None = None,
) -> tuple[list[LLMAlgorithm], list[dict[str, float]]]:
    """Train a population of LLM agents on a reasoning environment.

    Args:
        pop: the agents (a list of one for plain training).
        env: the environment serving prompts and scoring completions.
        max_steps: training steps (one prompt batch per step).
        evaluation_interval: evaluate every this many steps; the last step is always evaluated.
        evaluate_at_start: evaluate before the first step too (the "before" reward).
        logger: where metrics go; by default stdout only, one line per step.
        progress: show a progress bar.
        checkpoint: save run checkpoints (every member, the data position, RNG states) every
            ``checkpoint.interval`` steps and on the last step, and resume as ``checkpoint.resume`` says.
            A resumed run continues at the saved global step up to ``max_steps`` (the total), serves exactly
            the next prompt batch, and skips ``evaluate_at_start``. None (default) saves nothing.

    Returns:
        The trained population and the metrics history: one dict per (step, agent) with ``step``,
        ``agent``, the training metrics and, on evaluation steps, ``eval/reward``. A resumed run's history
        holds the steps it ran itself.
    """
    if not pop:
        raise ValueError("pop is empty; pass a list with at least one agent.")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    if evaluation_interval < 1:
        raise ValueError(f"evaluation_interval must be >= 1, got {evaluation_interval}.")
    logger = logger or MetricsLogger()
    history: list[dict[str, float]] = []
    manager = CheckpointManager(checkpoint, dist_agent=pop[0]) if checkpoint is not None else None
    resumed = manager.restore(pop, env) if manager is not None else None
    start, samples_seen = (resumed.global_step, resumed.samples_seen) if resumed is not None else (0, 0)
    if resumed is None and evaluate_at_start:
        for agent in pop:
            row = {"step": 0.0, "agent": float(agent.index), "eval/reward": float(agent.test(env).mean())}
            history.append(row)
            logger.log(0, {key: value for key, value in row.items() if key != "step"})
    # A resumed env already stands after the last batch it served: continue with the next one.
    prompts = env.advance() if resumed is not None else env.reset(reset_dataloaders=True)
    steps = range(start + 1, max_steps + 1)
    try:
        for step in tqdm(steps, desc="training", disable=not progress, dynamic_ncols=True):
            for agent in pop:
                row = {"step": float(step), "agent": float(agent.index)} | _train_step(agent, env, prompts)
                if step % evaluation_interval == 0 or step == max_steps:
                    row["eval/reward"] = float(agent.test(env).mean())
                history.append(row)
                logger.log(step, {key: value for key, value in row.items() if key != "step"})
            samples_seen += len(prompts)
            if manager is not None and manager.should_save(step, max_steps):
                run_id = getattr(logger, "wandb_run_id", None)
                manager.save(step, pop, env, samples_seen=samples_seen, wandb_run_id=run_id)
            prompts = env.advance()
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


def _train_step(agent: LLMAlgorithm, env: ReasoningGym, prompts: Any) -> dict[str, float]:
    started = time.perf_counter()
    result = agent.get_action(prompts, training=True)
    rewards = env.score(prompts, result)
    generated = time.perf_counter()
    metrics = agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))
    finished = time.perf_counter()
    tokens = int(result.attention_mask.sum())
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "loss/policy": metrics["mean_loss"],
        "loss/kl": metrics["mean_kl"],
        "policy/clip_fraction": metrics.get("clip_fraction", 0.0),
        "policy/entropy": metrics.get("entropy", 0.0),
        "policy/grad_norm": metrics.get("grad_norm", 0.0),
        "completion/length": float(result.completion_lengths.float().mean()),
        "perf/generate_s": generated - started,
        "perf/learn_s": finished - generated,
        "perf/tokens_per_s": tokens / max(finished - started, 1e-9),
    }


def mean_eval_reward(history: list[dict[str, float]], step: int) -> float:
    """Mean held-out reward over the population at ``step`` (NaN if no evaluation happened then)."""
    rewards = [row["eval/reward"] for row in history if row["step"] == step and "eval/reward" in row]
    return float(torch.tensor(rewards).mean()) if rewards else float("nan")
