"""Letter-string tasks: reverse or sort a short random string of letters.

These are the built-in tasks of the quickstart and the "it learned" tests. They are chosen because a
model with under a million parameters can learn them on a CPU in minutes, and because the rule
generalises: the held-out strings were never seen in training, so a rising held-out reward means the
policy learned the rule rather than memorised answers.

A sample is ``{"question": "reverse: cabd", "answer": "dbac"}``. Strings are drawn with replacement
from the first ``alphabet_size`` lowercase letters, with a length in ``[min_length, max_length]``.
The train and test splits are disjoint by construction (every string appears at most once overall).

Two rewards: ``exact_match_reward`` (1.0 for the exact answer, else 0.0; the built-in tasks use it) and
``letters_reward`` (the exact answer scores 1.0, an inexact one at most 0.5 of partial credit for the
letters placed right). Measured on the quickstart, the binary reward raised held-out exact answers
faster: partial credit lets GRPO settle for "mostly right", which greedy decoding then rarely turns into
an exact answer.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np

Sample = dict[str, str]

TRANSFORMS: dict[str, Callable[[str], str]] = {
    "reverse": lambda letters: letters[::-1],
    "sort": lambda letters: "".join(sorted(letters)),
}

# Cap on the partial credit of an inexact answer; an exact answer scores 1.0.
PARTIAL_CREDIT = 0.5


def make_letters_dataset(
    operation: str,
    num_train: int,
    num_test: int,
    seed: int = 0,
    *,
    min_length: int = 3,
    max_length: int = 5,
    alphabet_size: int = 8,
) -> tuple[list[Sample], list[Sample]]:
    """Disjoint train and test splits of ``operation`` ("reverse" or "sort") on random letter strings.

    Args:
        operation: which rule the answer applies to the letters; a key of ``TRANSFORMS``.
        num_train: training samples.
        num_test: held-out samples; none of their strings occurs in the training split.
        seed: the splits are a deterministic function of the arguments.
        min_length, max_length: string lengths are drawn uniformly from this inclusive range.
        alphabet_size: letters are drawn from the first ``alphabet_size`` lowercase letters (2..26).

    Returns:
        ``(train, test)``, lists of ``{"question": f"{operation}: {letters}", "answer": ...}``.
    """
    if operation not in TRANSFORMS:
        raise ValueError(f"operation={operation!r} is not a letters task; choose one of {sorted(TRANSFORMS)}.")
    if not 2 <= alphabet_size <= 26:
        raise ValueError(f"alphabet_size must be in [2, 26], got {alphabet_size}.")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}.")
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}.")
    available = sum(alphabet_size**length for length in range(min_length, max_length + 1))
    if num_train + num_test > available // 2:
        raise ValueError(
            f"num_train + num_test = {num_train + num_test} is more than half of the {available} distinct strings; "
            "raise max_length or alphabet_size, or ask for fewer samples."
        )
    alphabet = string.ascii_lowercase[:alphabet_size]
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    strings: list[str] = []
    while len(strings) < num_train + num_test:
        length = int(rng.integers(min_length, max_length + 1))
        letters = "".join(alphabet[i] for i in rng.integers(0, alphabet_size, size=length))
        if letters not in seen:
            seen.add(letters)
            strings.append(letters)
    transform = TRANSFORMS[operation]
    samples = [{"question": f"{operation}: {letters}", "answer": transform(letters)} for letters in strings]
    return samples[:num_train], samples[num_train:]


def make_reverse_dataset(num_train: int, num_test: int, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Reverse a string of 3-5 letters from a-h: ``"reverse: cabd"`` -> ``"dbac"``."""
    return make_letters_dataset("reverse", num_train, num_test, seed)


def make_sort_dataset(num_train: int, num_test: int, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Sort a string of 3-5 letters from a-h alphabetically: ``"sort: cabd"`` -> ``"abcd"``."""
    return make_letters_dataset("sort", num_train, num_test, seed)


def exact_match_reward(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 when the completion, stripped of surrounding whitespace, is exactly the answer; else 0.0."""
    return 1.0 if completion.strip() == answer else 0.0


def letters_reward(completion: str, answer: str, prompt: str = "") -> float:
    """1.0 for the exact answer, else ``0.5 * (letters right in place) / max(len(completion), len(answer))``.

    Surrounding whitespace is ignored. The partial credit counts positions where the completion has the
    answer's letter, and divides by the longer of the two strings so that padding an answer with extra
    letters costs credit. An empty completion scores 0.0. Values lie in [0, 1].

    Examples: answer "dbac": "dbac" -> 1.0, "dbca" -> 0.25, "dbacx" -> 0.4, "xyz" -> 0.0, "" -> 0.0.
    """
    completion = completion.strip()
    if completion == answer:
        return 1.0
    if not completion:
        return 0.0
    right = sum(produced == expected for produced, expected in zip(completion, answer, strict=False))
    return PARTIAL_CREDIT * right / max(len(completion), len(answer))
