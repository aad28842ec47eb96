"""Recall the sequence: a built-in multi-turn memory game that a tiny model learns on the CPU in minutes.

The environment deals one digit per turn ("Remember 4.", then "Next 7.", ...) and the model must answer each
turn with every digit dealt so far, in order ("4", then "47", ...). A wrong answer ends the episode. Each turn
answered right earns ``1 / max_turns``, and answering all of them is success. Several turns are really needed: a
digit is only shown once, in its own turn, so the last answer has to be read back from the earlier messages of
the conversation, and no answer can be given before its digit is dealt. Playing at random essentially never
wins (``num_symbols ** -(1 + 2 + ... + max_turns)``).

Compared with ``GuessTheNumber``, whose best next guess is a function of every reply so far (binary search),
what this game asks for is copying from the context, the skill a model under a million parameters picks up
quickly, so it shows the multi-turn pipeline learning end to end in a few minutes.
"""

from __future__ import annotations

import random
import re
from typing import Any

DIGIT = re.compile(r"\d")
DEALT = re.compile(r"(?:Remember|Next) (\d)\.")  # the environment's message that deals a digit


class RecallTheSequence:
    """A ``MultiTurnEnv``: repeat the growing sequence of digits for ``max_turns`` turns."""

    def __init__(self, max_turns: int = 3, num_symbols: int = 10) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
        if not 2 <= num_symbols <= 10:
            raise ValueError(f"num_symbols must be in [2, 10] (the digits 0 .. num_symbols - 1), got {num_symbols}.")
        self.max_turns, self.num_symbols = max_turns, num_symbols
        self.system_prompt: str | None = None
        self.sequence = ""
        self.turns_used = 0

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        rng = random.Random(seed)
        self.sequence = "".join(str(rng.randrange(self.num_symbols)) for _ in range(self.max_turns))
        self.turns_used = 0
        return f"Remember {self.sequence[0]}.", {"sequence": self.sequence}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.turns_used += 1
        expected = self.sequence[: self.turns_used]
        answered = "".join(DIGIT.findall(action))
        info: dict[str, Any] = {"sequence": self.sequence, "turns": self.turns_used, "success": False}
        if answered != expected:
            return f"Wrong, it was {expected}.", 0.0, True, False, info
        reward = 1.0 / self.max_turns
        if self.turns_used == self.max_turns:
            info["success"] = True
            return "Correct!", reward, True, False, info
        return f"Next {self.sequence[self.turns_used]}.", reward, False, False, info

    def close(self) -> None:
        """Nothing to release."""


def dealt_digits(messages: list[dict[str, str]]) -> str:
    """The digits the environment dealt in ``messages`` (one per "Remember d." / "Next d." user message), in order."""
    dealt = []
    for message in messages:
        if message["role"] != "user":
            continue
        found = DEALT.fullmatch(message["content"])
        if found:
            dealt.append(found.group(1))
    return "".join(dealt)


def recall_policy(strategy: str = "recall", num_symbols: int = 10, **_: object):
    """A scripted player for warm-start demonstrations: ``policy(messages, rng) -> answer``.

    ``"recall"`` answers right (every digit dealt so far); ``"random"`` answers with as many random digits, which
    teaches the answer format and nothing of the skill.
    """
    if strategy not in {"recall", "random"}:
        raise ValueError(f"strategy={strategy!r}; choose 'recall' or 'random'.")

    def policy(messages: list[dict[str, str]], rng: random.Random) -> str:
        dealt = dealt_digits(messages)
        if strategy == "recall":
            return dealt
        return "".join(str(rng.randrange(num_symbols)) for _ in dealt)

    return policy
