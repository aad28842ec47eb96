"""Guess the number: a built-in multi-turn game that needs several turns and has a clear success rate.

The environment picks a secret integer in [low, high] from the episode's seed. Each turn the model answers with a
number; the environment replies "higher", "lower" or ends the episode when the guess is right. Finding it earns
``1 - turn_penalty * (turns used - 1)``, so fewer turns earn more; a reply that is not a number earns nothing and
is told so. Binary search finds any number in ceil(log2(high - low + 1)) turns, so a model that only guesses cannot
do well and a model that listens to the replies can.

Two options make the game easier to learn from scratch, without changing what success means. ``reply="range"``
adds the numbers still possible to each reply ("higher: from 5 to 8"), so listening is reading the latest message
rather than reasoning over the whole history. ``consistent_guess_reward`` pays a small reward for each wrong guess
that the replies so far still allowed: a dense per-turn signal (what ``advantage_granularity="turn"`` uses) for
the skill that winning needs.
"""

from __future__ import annotations

import random
import re
from typing import Any

NUMBER = re.compile(r"-?\d+")


class GuessTheNumber:
    """A ``MultiTurnEnv``: find the secret number in at most ``max_turns`` guesses."""

    def __init__(
        self,
        low: int = 1,
        high: int = 8,
        max_turns: int = 4,
        turn_penalty: float = 0.1,
        reply: str = "direction",
        consistent_guess_reward: float = 0.0,
    ) -> None:
        if high <= low:
            raise ValueError(f"high must be > low; got low={low}, high={high}.")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
        if reply not in {"direction", "range"}:
            raise ValueError(f"reply={reply!r}; choose 'direction' (higher / lower) or 'range' (and what is left).")
        if not 0.0 <= consistent_guess_reward < 1.0:
            raise ValueError(f"consistent_guess_reward must be in [0, 1), got {consistent_guess_reward}.")
        self.low, self.high, self.max_turns, self.turn_penalty = low, high, max_turns, turn_penalty
        self.reply, self.consistent_guess_reward = reply, consistent_guess_reward
        self.system_prompt: str | None = None
        self.target = low
        self.turns_used = 0
        self.possible = (low, high)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.target = random.Random(seed).randint(self.low, self.high)
        self.turns_used = 0
        self.possible = (self.low, self.high)
        return f"Guess my number from {self.low} to {self.high}.", {"target": self.target}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turns_used += 1
        found = NUMBER.search(action)
        info: dict[str, Any] = {"target": self.target, "turns": self.turns_used, "success": False}
        if found is None:
            return "Answer with a number.", 0.0, False, self.turns_used >= self.max_turns, info
        guess = int(found.group())
        if guess == self.target:
            info["success"] = True
            return "Correct!", 1.0 - self.turn_penalty * (self.turns_used - 1), True, False, info
        lo, hi = self.possible
        reward = self.consistent_guess_reward if lo <= guess <= hi else 0.0
        reply = "higher" if guess < self.target else "lower"
        self.possible = narrowed(self.possible, guess, reply)
        if self.reply == "range":
            reply += f": from {self.possible[0]} to {self.possible[1]}"
        return reply, reward, False, self.turns_used >= self.max_turns, info

    def close(self) -> None:
        """Nothing to release."""


def narrowed(possible: tuple[int, int], guess: int, reply: str) -> tuple[int, int]:
    """The range ``possible`` after ``guess`` drew ``reply`` ("higher..." / "lower..."; anything else changes nothing)."""
    low, high = possible
    if reply.startswith("higher"):
        return max(low, guess + 1), high
    if reply.startswith("lower"):
        return low, min(high, guess - 1)
    return possible


def remaining_range(messages: list[dict[str, str]], low: int, high: int) -> tuple[int, int]:
    """The numbers still possible after the replies in ``messages`` (a chat of guesses and "higher" / "lower")."""
    for guess_message, reply_message in zip(messages, messages[1:], strict=False):
        if guess_message["role"] != "assistant" or reply_message["role"] != "user":
            continue
        found = NUMBER.search(guess_message["content"])
        if found is None:
            continue
        low, high = narrowed((low, high), int(found.group()), reply_message["content"])
    return low, max(low, high)  # replies from a real game never contradict; max() keeps a range non-empty


def demonstration_policy(low: int = 1, high: int = 8, strategy: str = "random", **_: object):
    """A scripted player for warm-start demonstrations: ``policy(messages, rng) -> guess``.

    ``"random"`` guesses any number in [low, high] and ignores the replies (it teaches the answer format only);
    ``"consistent"`` guesses at random among the numbers the replies still allow; ``"bisect"`` plays binary search.
    """
    if strategy not in {"random", "consistent", "bisect"}:
        raise ValueError(f"strategy={strategy!r}; choose 'random', 'consistent' or 'bisect'.")

    def policy(messages: list[dict[str, str]], rng: random.Random) -> str:
        if strategy == "random":
            return str(rng.randint(low, high))
        lo, hi = remaining_range(messages, low, high)
        return str((lo + hi) // 2 if strategy == "bisect" else rng.randint(lo, hi))

    return policy
