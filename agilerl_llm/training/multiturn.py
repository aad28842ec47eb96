"""``finetune_llm_multiturn``: RL on multi-turn environments (``envs/multiturn.py``) with the population loop.

Each step serves a batch of episode seeds; every seed is played by ``group_size`` members of a group (GRPO compares
them), each in its own environment from ``env_factory``. The agent learns from the token trajectories: the
cumulative episode reward by default, or per-turn rewards with ``advantage_granularity="turn"`` (GRPO), with the
vLLM sampling log-probs when the engine reports them. Evaluation plays the fixed held-out seeds greedily.

The seed stream is the loop's "data": its position is saved in run checkpoints and restored on resume, and under
several processes each rank plays its slice of every batch (``envs/sharding.py``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.checkpoint.run import CheckpointConfig
from agilerl_llm.envs.multiturn import MultiTurnBatch, MultiTurnEnv, collect_episodes
from agilerl_llm.envs.sharding import ShardedData, held_out_shard, rank_slice
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.loop import run_population_loop


class EpisodeSeeds(ShardedData):
    """The training seeds, a batch per step (seed + step * batch + i), and the fixed held-out seeds.

    Args:
        episodes_per_step: distinct seeds per step over all processes (each played by ``group_size`` episodes).
        seed: where the training stream starts.
        eval_seeds: the held-out seeds (never trained on when disjoint from the stream; the default is).
    """

    def __init__(self, episodes_per_step: int, seed: int = 0, eval_seeds: Sequence[int] | None = None) -> None:
        if episodes_per_step < 1:
            raise ValueError(f"episodes_per_step must be >= 1, got {episodes_per_step}.")
        self.episodes_per_step, self.seed = episodes_per_step, seed
        self.eval_seeds = list(eval_seeds) if eval_seeds is not None else [10**9 + i for i in range(32)]
        self.position = 0

    def reset(self, reset_dataloaders: bool = False) -> list[int]:
        if reset_dataloaders:
            self.position = 0
        return self._batch()

    def advance(self) -> list[int]:
        self.position += 1
        return self._batch()

    def _batch(self) -> list[int]:
        first = self.seed + self.position * self.episodes_per_step
        global_batch = list(range(first, first + self.episodes_per_step))
        if self.episodes_per_step % self.world_size:
            raise ValueError(
                f"episodes_per_step={self.episodes_per_step} must be a multiple of the {self.world_size} processes."
            )
        return rank_slice(global_batch, self.rank, self.world_size)

    def held_out(self) -> list[int]:
        """This rank's held-out seeds (padded with -1 so every rank plays as many; -1 rows are not counted)."""
        return [
            self.eval_seeds[i] if i >= 0 else -1
            for i in held_out_shard(len(self.eval_seeds), self.rank, self.world_size)
        ]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def __len__(self) -> int:
        return self.episodes_per_step


def play(
    agent: LLMAlgorithm,
    env_factory: Callable[[], MultiTurnEnv],
    seeds: Sequence[int],
    tokenizer: Any,
    *,
    group_size: int,
    training: bool,
) -> MultiTurnBatch:
    """Each seed played by ``group_size`` fresh environments (rows of a seed contiguous)."""
    repeated = [seed for seed in seeds for _ in range(group_size)]
    envs = [env_factory() for _ in repeated]
    try:
        return collect_episodes(agent, envs, repeated, tokenizer, training=training)
    finally:
        for env in envs:
            env.close()


def learn_from_episodes(agent: LLMAlgorithm, batch: MultiTurnBatch) -> dict[str, float]:
    """``agent.learn`` on a multi-turn batch: per-turn rewards and turn ids (GRPO), sampling log-probs if any."""
    extra: dict[str, Any] = {}
    if batch.sampling_logprobs is not None:
        extra["sampling_logps"] = batch.sampling_logprobs
    if "turn_ids" in inspect.signature(agent.learn).parameters:
        extra["turn_ids"] = batch.turn_ids
    return agent.learn(batch.experience(), **extra)


def evaluate_episodes(
    agent: LLMAlgorithm, env_factory: Callable[[], MultiTurnEnv], seeds: EpisodeSeeds, tokenizer: Any
) -> dict[str, float]:
    """Greedy episodes on the held-out seeds: mean return (appended to ``agent.fitness``) and success rate.

    Success is ``info["success"]`` of an episode's last step when the env reports it (else a positive return).
    """
    own = seeds.held_out()
    batch = play(agent, env_factory, [s if s >= 0 else seeds.eval_seeds[0] for s in own], tokenizer, group_size=1,
                 training=False)  # fmt: skip
    counted = torch.tensor([s >= 0 for s in own])
    success = torch.tensor(
        [float(info.get("success", ret > 0)) for info, ret in zip(batch.infos, batch.returns.tolist(), strict=True)]
    )
    totals = agent.dist.sum_floats(
        {
            "return": float(batch.returns[counted].sum()),
            "success": float(success[counted].sum()),
            "episodes": float(counted.sum()),
        }
    )
    mean_return = totals["return"] / max(totals["episodes"], 1.0)
    agent.fitness.append(mean_return)
    return {"eval/reward": mean_return, "eval/success": totals["success"] / max(totals["episodes"], 1.0)}


def finetune_llm_multiturn(
    pop: list[LLMAlgorithm],
    env_factory: Callable[[], MultiTurnEnv],
    tokenizer: Any,
    *,
    max_steps: int,
    episodes_per_step: int = 8,
    seed: int = 0,
    eval_seeds: Sequence[int] | None = None,
    evaluation_interval: int = 10,
    evaluate_at_start: bool = True,
    logger: MetricsLogger | None = None,
    progress: bool = True,
    checkpoint: CheckpointConfig | None = None,
    evo_steps: int | None = None,
    tournament: Any | None = None,
    mutation: Any | None = None,
) -> tuple[list[LLMAlgorithm], list[dict[str, float]]]:
    """Train a population on a multi-turn environment (the loop is ``training/loop.py``).

    Args:
        pop: the agents (``GRPO.population(...)`` for several on one base).
        env_factory: builds one fresh ``MultiTurnEnv``; called once per episode.
        tokenizer: the agents' tokenizer, with the chat template episodes are built through.
        max_steps: training steps; each plays ``episodes_per_step`` seeds x ``group_size`` episodes per member.
        episodes_per_step: distinct seeds per step, over all processes.
        seed: first seed of the training stream.
        eval_seeds: held-out seeds played greedily at every evaluation (default: 32 seeds far from the stream).
        evaluation_interval, evaluate_at_start, logger, progress, checkpoint, evo_steps, tournament, mutation: as in
            ``finetune_llm_reasoning``. A resumed run continues with the next seed batch.

    Returns:
        The population and the metrics history (``eval/reward`` is the mean held-out return, ``eval/success`` the
        share of held-out episodes won).
    """
    seeds = EpisodeSeeds(episodes_per_step, seed, eval_seeds)

    def train_step(agent: LLMAlgorithm, batch_seeds: list[int]) -> dict[str, float]:
        started = time.perf_counter()
        batch = play(agent, env_factory, batch_seeds, tokenizer, group_size=getattr(agent, "group_size", 1),
                     training=True)  # fmt: skip
        played = time.perf_counter()
        metrics = learn_from_episodes(agent, batch)
        returns = agent.dist.gather_rows(batch.returns)
        success = [float(info.get("success", 0.0)) for info in batch.infos]
        turns = (batch.turn_ids.max(dim=1).values + 1).float()
        return {
            "reward/mean": float(returns.mean()),
            "reward/std": float(returns.std()) if returns.numel() > 1 else 0.0,
            "episode/success": sum(success) / len(success),
            "episode/turns": float(turns.mean()),
            "episode/truncated": float(batch.truncated.float().mean()),
            "loss/policy": metrics["mean_loss"],
            "loss/kl": metrics["mean_kl"],
            "policy/grad_norm": metrics.get("grad_norm", 0.0),
            "perf/play_s": played - started,
            "perf/learn_s": time.perf_counter() - played,
        }

    return run_population_loop(
        pop,
        seeds,
        max_steps=max_steps,
        train_step=train_step,
        evaluate=lambda agent: evaluate_episodes(agent, env_factory, seeds, tokenizer),
        evaluation_interval=evaluation_interval,
        evaluate_at_start=evaluate_at_start,
        logger=logger,
        progress=progress,
        checkpoint=checkpoint,
        evo_steps=evo_steps,
        tournament=tournament,
        mutation=mutation,
    )
