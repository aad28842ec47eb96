"""The multi-turn job: base model -> optional warm start on scripted episodes -> RL in an environment.

``run_multiturn_job(config)`` is what ``agilerl-llm train`` runs when the config has a ``multiturn:`` section
(``configs/multiturn.yaml``). It shares the reasoning job's surfaces: the base crosses the disk through
``save_pretrained`` / ``from_pretrained``, the population, evolution, run checkpoints and metric sinks come from
the same sections, and the result is a ``JobResult`` whose "exact" figures are the held-out success rate.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from agilerl_llm.envs.multiturn import MultiTurnEnv
from agilerl_llm.envs.tasks import MULTITURN_ENVS
from agilerl_llm.training.config import ConfigError, MultiTurnSettings, RunConfig
from agilerl_llm.training.job import (
    JobResult,
    build_population,
    evolution_arguments,
    make_logger,
    shared_base_model,
    start_processes,
)
from agilerl_llm.training.loop import fittest_first
from agilerl_llm.training.multiturn import finetune_llm_multiturn
from agilerl_llm.training.warmstart import episode_demonstrations

# Demonstration episodes use negative seeds: never a training seed (counting up from multiturn.seed >= 0) and never
# a held-out one.
NUM_DEMONSTRATION_EPISODES = 400


def env_factory(settings: MultiTurnSettings) -> Callable[[], MultiTurnEnv]:
    """A callable building a fresh environment per episode: a built-in one, or ``"package.module:factory"``.

    The factory is called once here, so a wrong name, bad ``env_kwargs`` or an object that is not a
    ``MultiTurnEnv`` fails before any model is built, with the field in the message.
    """
    if settings.env in MULTITURN_ENVS:
        make: Callable[..., Any] = MULTITURN_ENVS[settings.env].make_env
    else:
        module_name, _, attribute = settings.env.partition(":")
        try:
            make = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"multiturn.env: cannot load {settings.env!r} ({error}).") from error
    factory = functools.partial(make, **settings.env_kwargs)
    try:
        probe = factory()
    except TypeError as error:
        raise ConfigError(f"multiturn.env_kwargs: {settings.env} rejected {settings.env_kwargs}: {error}") from error
    if not isinstance(probe, MultiTurnEnv):
        raise ConfigError(
            f"multiturn.env: {settings.env} returned a {type(probe).__name__}, not a MultiTurnEnv (it needs max_turns, "
            "reset(seed), step(action) and close())."
        )
    probe.close()
    return factory


def demonstrations_for(
    config: RunConfig, factory: Callable[[], MultiTurnEnv]
) -> Callable[[PreTrainedTokenizerBase], list[tuple[str, str]]] | None:
    """The warm start's pairs: episodes of the built-in environment's scripted player (None for a user env)."""
    settings = config.multiturn
    task = MULTITURN_ENVS.get(settings.env)
    if task is None or task.demonstration_policy is None:
        if config.warm_start.steps > 0:
            raise ConfigError(
                f"warm_start.steps is {config.warm_start.steps} but multiturn.env {settings.env!r} has no scripted "
                "demonstrations; set warm_start.steps: 0 (or give model.path a model that already knows the format)."
            )
        return None
    policy = task.demonstration_policy(**settings.env_kwargs)
    seeds = [-1 - i for i in range(NUM_DEMONSTRATION_EPISODES)]
    return lambda tokenizer: episode_demonstrations(tokenizer, factory, policy, seeds, seed=config.warm_start.seed)


def run_multiturn_job(config: RunConfig) -> JobResult:
    """Run a ``multiturn:`` config end to end and report held-out return and success before and after RL."""
    if config.multiturn is None:
        raise ConfigError("run_multiturn_job needs a config with a multiturn section.")
    started = time.perf_counter()
    settings = config.multiturn
    factory = env_factory(settings)
    demonstrations = demonstrations_for(config, factory)
    accelerator, dist = start_processes(config)
    base_dir, tokenizer = shared_base_model(config, dist, demonstrations)
    pop = build_population(config, base_dir, tokenizer, accelerator)
    eval_seeds = [settings.eval_seed + i for i in range(settings.num_eval_episodes)]
    pop, history = finetune_llm_multiturn(
        pop,
        factory,
        tokenizer,
        max_steps=config.training.max_steps,
        episodes_per_step=settings.episodes_per_step,
        seed=settings.seed,
        eval_seeds=eval_seeds,
        evaluation_interval=config.training.evaluation_interval,
        evaluate_at_start=config.training.evaluate_at_start,
        logger=make_logger(config, dist.is_main),
        progress=config.logging.progress,
        checkpoint=config.checkpoint,
        **evolution_arguments(config.evolution),
    )
    pop = fittest_first(pop)
    evaluated = [row for row in history if "eval/success" in row]
    first = [row for row in evaluated if row["step"] == evaluated[0]["step"]] if evaluated else []
    last = [row for row in evaluated if row["step"] == evaluated[-1]["step"] and row["agent"] == pop[0].index]
    nan = float("nan")
    return JobResult(
        reward_before=_mean(first, "eval/reward") if first else nan,
        reward_after=last[-1]["eval/reward"] if last else nan,
        exact_before=_mean(first, "eval/success") if first else nan,
        exact_after=last[-1]["eval/success"] if last else nan,
        history=history,
        base_model_dir=base_dir,
        seconds=time.perf_counter() - started,
        population=pop,
        is_main=dist.is_main,
        exact_label="held-out success",
    )


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)
