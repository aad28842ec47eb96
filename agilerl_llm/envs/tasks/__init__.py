"""Built-in tasks: small datasets with a reward function, for the quickstart, tests and benchmarks.

``TASKS`` maps a task name to a ``Task``, a named tuple ``(make_dataset, reward_fn, system_prompt)``:

* ``make_dataset(num_train, num_test, seed) -> (train, test)``: disjoint lists of
  ``{"question", "answer"}`` samples, ready for ``ReasoningGym``;
* ``reward_fn(completion, answer, prompt) -> float`` in [0, 1] (exact match for the letters tasks);
* ``system_prompt``: the system message to render before each question, or None.

Usage::

    make_dataset, reward_fn, system_prompt = TASKS["reverse"]
    train, test = make_dataset(2000, 64, seed=0)
    env = ReasoningGym(train, test, tokenizer, reward_fn, system_prompt=system_prompt)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from agilerl_llm.envs.tasks.guess_number import GuessTheNumber, demonstration_policy
from agilerl_llm.envs.tasks.letters import (
    exact_match_reward,
    letters_reward,
    make_reverse_dataset,
    make_sort_dataset,
)
from agilerl_llm.envs.tasks.recall import RecallTheSequence, recall_policy


class Task(NamedTuple):
    """A built-in task: how to make its data, how to score a completion, and its system prompt."""

    make_dataset: Callable[[int, int, int], tuple[list[dict[str, Any]], list[dict[str, Any]]]]
    reward_fn: Callable[[str, Any, str], float]
    system_prompt: str | None


TASKS: dict[str, Task] = {
    "reverse": Task(make_reverse_dataset, exact_match_reward, None),
    "sort": Task(make_sort_dataset, exact_match_reward, None),
}


class MultiTurnTask(NamedTuple):
    """A built-in multi-turn environment: its factory (keyword arguments from ``multiturn.env_kwargs``) and, for a
    warm start, a scripted player ``demonstration_policy(**env_kwargs) -> policy(messages, rng) -> action``."""

    make_env: Callable[..., Any]
    demonstration_policy: Callable[..., Callable[[list[dict[str, str]], Any], str]] | None


MULTITURN_ENVS: dict[str, MultiTurnTask] = {
    "guess_number": MultiTurnTask(GuessTheNumber, demonstration_policy),
    "recall": MultiTurnTask(RecallTheSequence, recall_policy),
}


def get_task(name: str) -> Task:
    """The task registered as ``name``; the error lists the valid names."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a built-in task; choose one of {sorted(TASKS)}.")
    return TASKS[name]


__all__ = [
    "MULTITURN_ENVS",
    "TASKS",
    "MultiTurnTask",
    "Task",
    "exact_match_reward",
    "get_task",
    "letters_reward",
    "make_reverse_dataset",
    "make_sort_dataset",
]
