"""Multi-turn text environments: the protocol users write, and episodes collected as token trajectories.

A user writes an environment with AgileRL's shape (``MultiTurnEnv``): ``reset(seed) -> (observation, info)`` and
``step(action_text) -> (observation, reward, terminated, truncated, info)``, plus ``max_turns`` and ``close()``
(``system_prompt`` optional). Observations are text (one user message) or a list of chat messages.

``collect_episodes`` plays B x G episodes in lock-step with an agent: every turn, ONE generate call of the agent's
rollout engine serves every live episode, and episodes that ended stop generating. Each episode becomes one row of
tokens, built through the tokenizer's chat template so that the model sees exactly what it would at inference:

* the model's generated ids are kept exactly as generated, never re-tokenised from text;
* the environment's tokens (its observation and the template's glue around it) are appended at the template's turn
  boundary and are never in the action mask;
* ``turn_ids`` give each action token its turn (-1 elsewhere); per-turn rewards form a (N, max_turns) tensor, each
  reward on the turn whose last token ends it (zeros for turns an episode never reached);
* an episode that would outgrow ``max_model_len`` is truncated (``truncated=True``, ``info["truncated_by"]``).

The turn boundary. A chat template closes an assistant message with some text (Qwen2: ``<|im_end|>\\n``; Llama 3:
``<|eot_id|>``), which usually starts with the eos token the model stops on. After an action, the environment's
tokens are that closing text minus the part the model already generated (its eos), then what the template adds for
the observation up to the next generation prompt. ``ChatTurns`` reads the closing text off the template once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from agilerl_llm.rollout.hf import context_limit, eos_token_ids

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm

Observation = str | list[dict[str, str]]
_SENTINEL = "\u2063agilerl-llm-boundary\u2063"


@runtime_checkable
class MultiTurnEnv(Protocol):
    """What a multi-turn environment provides (AgileRL's shape). ``system_prompt`` (str or None) is optional."""

    max_turns: int

    def reset(self, seed: int | None = None) -> tuple[Observation, dict[str, Any]]:
        """Start an episode; returns the first observation and an info dict."""
        ...

    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Apply the model's reply; returns (observation, reward, terminated, truncated, info)."""
        ...

    def close(self) -> None:
        """Release what the environment holds."""
        ...


class MultiTurnEnvError(RuntimeError):
    """An environment misbehaved (raised, returned a non-finite reward or a bad observation); names the episode."""


class ChatTurns:
    """Token ids of a conversation's opening prompt and of each environment turn, through a chat template."""

    def __init__(self, tokenizer: Any) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template; multi-turn episodes are built through one.")
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        rendered = self.render(probe, add_generation_prompt=False)
        if _SENTINEL not in rendered:
            raise ValueError("the chat template drops assistant messages; it cannot render a multi-turn episode.")
        self.assistant_closing = rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def opening_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The first prompt: the conversation so far, then the template's generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def environment_ids(
        self, history: list[dict[str, str]], observation: list[dict[str, str]], generated_stop: str | None
    ) -> list[int]:
        """The tokens that follow an action: the rest of the assistant message's closing, the observation's messages
        and the next generation prompt.

        Args:
            history: the conversation up to and including the assistant message just generated.
            observation: the environment's reply as chat messages.
            generated_stop: the text of the stop token the model generated last (its eos), or None when the action
                was cut by the token budget.
        """
        before = self.render(history, add_generation_prompt=False)
        after = self.render(history + observation, add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError(
                "the chat template renders a conversation differently once a message is appended; multi-turn "
                "episodes need a template that extends by appending."
            )
        closing = self.assistant_closing
        if generated_stop and closing.startswith(generated_stop):
            closing = closing[len(generated_stop) :]  # the model already wrote it
        return self.encode(closing + after[len(before) :])


@dataclass
class _Episode:
    row: int
    seed: int | None
    env: MultiTurnEnv
    messages: list[dict[str, str]]
    token_ids: list[int]
    generated: list[bool]
    turn_of: list[int]
    rewards: list[float] = field(default_factory=list)
    sampling_logprobs: list[torch.Tensor] = field(default_factory=list)
    done: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MultiTurnBatch:
    """Episodes as learner rows (N = number of episodes, S tokens, T = S - 1 log-prob positions, K = max_turns).

    Attributes:
        completion_ids: (N, S) the whole episode: opening prompt, actions, environment tokens; right-padded.
        attention_mask: (N, S) bool, real tokens.
        action_mask: (N, T) bool, True where token t + 1 was generated by the model.
        turn_ids: (N, T) int64 turn of each action token, -1 elsewhere.
        turn_rewards: (N, K) each turn's reward, 0 for turns not reached.
        returns: (N,) cumulative episode reward.
        truncated: (N,) bool.
        infos: the last info dict of each episode.
        sampling_logprobs: per-row sampling log-probs of the action tokens, concatenated across turns (vLLM).
    """

    completion_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    turn_ids: torch.Tensor
    turn_rewards: torch.Tensor
    returns: torch.Tensor
    truncated: torch.Tensor
    infos: list[dict[str, Any]]
    sampling_logprobs: list[torch.Tensor] | None = None

    def experience(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(completion_ids, action_masks, turn_rewards, attention_mask)``, what ``learn()`` takes."""
        return self.completion_ids, self.action_mask, self.turn_rewards, self.attention_mask


def collect_episodes(
    agent: LLMAlgorithm,
    envs: Sequence[MultiTurnEnv],
    seeds: Sequence[int | None],
    tokenizer: Any,
    *,
    training: bool = True,
) -> MultiTurnBatch:
    """Play one episode in each env, in lock-step, and return them as learner rows.

    Args:
        agent: generates with its rollout engine: sampled with its training settings when ``training``, greedy
            otherwise. One completion per live episode per turn.
        envs: one environment per episode (rows of a group, which share a seed, contiguous).
        seeds: ``reset(seed)`` for each env.
        tokenizer: the agent's tokenizer, with a chat template.
        training: sample (True) or decode greedily (False).
    """
    if len(envs) != len(seeds) or not envs:
        raise ValueError(f"collect_episodes needs one seed per env; got {len(envs)} envs and {len(seeds)} seeds.")
    turns = ChatTurns(tokenizer)
    max_turns = _max_turns(envs)
    limit = context_limit(agent.actor, agent.max_model_len)
    stops = {token: tokenizer.convert_ids_to_tokens(token) for token in eos_token_ids(agent.actor)}
    episodes = [_start(row, env, seed, turns) for row, (env, seed) in enumerate(zip(envs, seeds, strict=True))]
    for turn in range(max_turns):
        live = [episode for episode in episodes if not episode.done]
        if not live:
            break
        result = agent.get_action(_left_padded(live, agent.pad_token_id), training=training, repeat_prompts=False)
        for position, episode in enumerate(live):
            action = [int(token) for token in result.completion_tokens(position)]
            if result.sampling_logprobs is not None:
                episode.sampling_logprobs.append(result.sampling_logprobs[position].cpu())
            _play_turn(episode, turn, action, turns, tokenizer, stops, limit, max_turns)
    return _as_batch(episodes, agent.pad_token_id, max_turns)


def _max_turns(envs: Sequence[MultiTurnEnv]) -> int:
    values = {getattr(env, "max_turns", None) for env in envs}
    if len(values) != 1 or not isinstance(next(iter(values)), int) or next(iter(values)) < 1:
        raise ValueError(f"every env needs the same max_turns >= 1; got {sorted(map(str, values))}.")
    return int(next(iter(values)))


def opening_messages(env: MultiTurnEnv, observation: Any, where: str) -> list[dict[str, str]]:
    """An episode's first messages: the env's system prompt (when it has one), then its reset observation."""
    system = getattr(env, "system_prompt", None)
    return ([{"role": "system", "content": system}] if system else []) + as_messages(observation, where)


def as_messages(observation: Any, where: str) -> list[dict[str, str]]:
    """An observation as chat messages: a string is one user message; a list of messages is kept as is."""
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    if isinstance(observation, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in observation
    ):
        return list(observation)
    raise MultiTurnEnvError(
        f"{where} returned an observation of type {type(observation).__name__}; return a string or a list of "
        "{'role': ..., 'content': ...} messages."
    )


def _start(row: int, env: MultiTurnEnv, seed: int | None, turns: ChatTurns) -> _Episode:
    where = f"episode {row} (seed {seed}): env.reset"
    try:
        observation, info = env.reset(seed=seed)
    except Exception as error:
        raise MultiTurnEnvError(f"{where} raised {type(error).__name__}: {error}") from error
    messages = opening_messages(env, observation, where)
    ids = turns.opening_ids(messages)
    return _Episode(row, seed, env, messages, ids, [False] * len(ids), [-1] * len(ids), info=dict(info or {}))


def _play_turn(
    episode: _Episode,
    turn: int,
    action: list[int],
    turns: ChatTurns,
    tokenizer: Any,
    stops: dict[int, str],
    limit: int,
    max_turns: int,
) -> None:
    """Append the action, step the env, then append its tokens (or end the episode)."""
    episode.token_ids += action
    episode.generated += [True] * len(action)
    episode.turn_of += [turn] * len(action)
    stop = stops.get(action[-1]) if action else None
    text = tokenizer.decode(action[:-1] if stop else action, skip_special_tokens=True)
    where = f"episode {episode.row} (seed {episode.seed}), turn {turn}: env.step"
    try:
        observation, reward, terminated, truncated, info = episode.env.step(text)
    except Exception as error:
        raise MultiTurnEnvError(f"{where} raised {type(error).__name__}: {error}") from error
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise MultiTurnEnvError(f"{where} returned reward={reward!r}; rewards must be finite numbers.")
    episode.rewards.append(float(reward))
    episode.info = dict(info or {})
    if terminated or truncated or turn + 1 == max_turns:
        episode.done, episode.truncated = True, bool(truncated) and not terminated
        return
    history = episode.messages + [{"role": "assistant", "content": text}]
    observed = as_messages(observation, where)
    env_ids = turns.environment_ids(history, observed, stop)
    if len(episode.token_ids) + len(env_ids) >= limit:  # no room left to generate the next action
        episode.done, episode.truncated = True, True
        episode.info["truncated_by"] = f"context length: max_model_len={limit} reached after turn {turn}"
        return
    episode.messages = history + observed
    episode.token_ids += env_ids
    episode.generated += [False] * len(env_ids)
    episode.turn_of += [-1] * len(env_ids)


def _left_padded(live: list[_Episode], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(episode.token_ids) for episode in live)
    ids = torch.full((len(live), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(live), width), dtype=torch.long)
    for row, episode in enumerate(live):
        ids[row, width - len(episode.token_ids) :] = torch.tensor(episode.token_ids)
        mask[row, width - len(episode.token_ids) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _as_batch(episodes: list[_Episode], pad_token_id: int, max_turns: int) -> MultiTurnBatch:
    rows, width = len(episodes), max(len(episode.token_ids) for episode in episodes)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.bool)
    generated = torch.zeros((rows, width), dtype=torch.bool)
    turn_of = torch.full((rows, width), -1, dtype=torch.long)
    rewards = torch.zeros((rows, max_turns), dtype=torch.float32)
    for row, episode in enumerate(episodes):
        length = len(episode.token_ids)
        ids[row, :length] = torch.tensor(episode.token_ids)
        attention[row, :length] = True
        generated[row, :length] = torch.tensor(episode.generated)
        turn_of[row, :length] = torch.tensor(episode.turn_of)
        rewards[row, : len(episode.rewards)] = torch.tensor(episode.rewards)
    logprobs = None
    if all(episode.sampling_logprobs for episode in episodes):
        logprobs = [torch.cat(episode.sampling_logprobs) for episode in episodes]
    return MultiTurnBatch(
        completion_ids=ids,
        attention_mask=attention,
        action_mask=generated[:, 1:],
        turn_ids=turn_of[:, 1:],
        turn_rewards=rewards,
        returns=rewards.sum(dim=1),
        truncated=torch.tensor([episode.truncated for episode in episodes]),
        infos=[episode.info for episode in episodes],
        sampling_logprobs=logprobs,
    )
