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

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.algorithms.generation import population_actions
from agilerl_llm.checkpoint.run import CheckpointConfig
from agilerl_llm.envs.reasoning import ReasoningGym
from agilerl_llm.rollout.base import ActionResult
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.loop import run_population_loop


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
    evo_steps: int | None = None,
    tournament: Any | None = None,
    mutation: Any | None = None,
) -> tuple[list[LLMAlgorithm], list[dict[str, float]]]:
    """Train a population of LLM agents on a reasoning environment (the loop is ``training/loop.py``).

    Args:
        pop: the agents (a list of one for plain training; ``GRPO.population(size, ...)`` for a population on
            one shared base model).
        env: the environment serving prompts and scoring completions.
        max_steps: training steps (one prompt batch per step).
        evaluation_interval: evaluate every this many steps; the last step is always evaluated.
        evaluate_at_start: evaluate before the first step too (the "before" reward).
        logger: where metrics go; by default stdout only, one line per step.
        progress: show a progress bar (and each generation's fitness table).
        checkpoint: save run checkpoints (every member, the data position, RNG states, evolution state) every
            ``checkpoint.interval`` steps and on the last step, export the fittest member every
            ``checkpoint.hf_save_interval`` steps, and resume as ``checkpoint.resume`` says. A resumed run continues
            at the saved global step up to ``max_steps`` (the total), serves exactly the next prompt batch, and
            skips ``evaluate_at_start``. None (default) saves nothing.
        evo_steps: evolve every this many steps: every member is evaluated on the held-out split, ``tournament``
            selects the next generation and ``mutation`` perturbs it. None (default) never evolves.
        tournament: a ``TournamentSelection`` (needed with ``evo_steps``).
        mutation: a ``Mutations``; None selects without mutating.

    Returns:
        The trained population and the metrics history: one dict per (step, agent) with ``step``,
        ``agent``, ``hp/<name>`` for mutable hyperparameters, the training metrics and, on evaluation steps,
        ``eval/reward``. A resumed run's history holds the steps it ran itself.
    """
    rollouts = BatchedRollouts()
    return run_population_loop(
        pop,
        env,
        max_steps=max_steps,
        before_step=rollouts.collect,
        train_step=lambda agent, prompts: _train_step(agent, env, prompts, rollouts.take(agent)),
        evaluate=lambda agent: {"eval/reward": float(agent.test(env).mean())},
        evaluation_interval=evaluation_interval,
        evaluate_at_start=evaluate_at_start,
        logger=logger,
        progress=progress,
        checkpoint=checkpoint,
        evo_steps=evo_steps,
        tournament=tournament,
        mutation=mutation,
    )


class BatchedRollouts:
    """One step's rollouts for a population on a shared vLLM engine, made by one batched call before the members
    learn (``population_actions``); members on HuggingFace generate are left to generate in their own step."""

    def __init__(self) -> None:
        self._results: dict[int, tuple[ActionResult, float]] = {}

    def collect(self, pop: list[LLMAlgorithm], prompts: Any) -> None:
        self._results.clear()
        if not any(hasattr(agent.rollout_engine, "generate_many") for agent in pop):
            return
        started = time.perf_counter()
        results = population_actions(pop, prompts, training=True)
        share = (time.perf_counter() - started) / len(pop)  # each member's share of the batched call
        self._results = {id(agent): (result, share) for agent, result in zip(pop, results, strict=True)}

    def take(self, agent: LLMAlgorithm) -> tuple[ActionResult, float] | None:
        return self._results.pop(id(agent), None)


def _train_step(
    agent: LLMAlgorithm, env: ReasoningGym, prompts: Any, collected: tuple[ActionResult, float] | None = None
) -> dict[str, float]:
    started = time.perf_counter()
    if collected is None:
        result = agent.get_action(prompts, training=True)
    else:
        result, generate_s = collected
        started -= generate_s
    rewards = env.score(prompts, result)
    generated = time.perf_counter()
    experience = (result.completion_ids, result.action_masks, rewards, result.attention_mask)
    # the engine's sampling log-probs (vLLM) feed the mismatch correction; HF generate reports none (None)
    metrics = agent.learn(experience, sampling_logps=result.sampling_logprobs)
    finished = time.perf_counter()
    tokens = agent.dist.sum_floats({"tokens": float(result.attention_mask.sum())})["tokens"]  # all ranks'
    all_rewards = agent.dist.gather_rows(rewards.flatten())  # the global batch's rewards
    critic = {"loss/value": metrics["value_loss"]} if "value_loss" in metrics else {}  # PPO's critic
    return critic | {
        "reward/mean": float(all_rewards.mean()),
        "reward/std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
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
