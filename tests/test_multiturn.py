"""Multi-turn episodes as token trajectories: masks, turn ids, per-turn rewards, template boundaries, truncation,
misbehaving environments, and learning from them. A real tiny model generates every action."""

from __future__ import annotations

import math
import random

import pytest
import torch

from agilerl_llm import GRPO, LLMPPO, LLMReinforce
from agilerl_llm.envs.multiturn import ChatTurns, MultiTurnEnv, MultiTurnEnvError, collect_episodes
from agilerl_llm.envs.tasks.guess_number import GuessTheNumber
from agilerl_llm.envs.tasks.recall import RecallTheSequence, recall_policy
from agilerl_llm.testing import build_tiny_tokenizer

EOS = "<|eos|>"


class ScriptedEnv:
    """Replies "reply k" to the k-th action, rewards k, never ends by itself; records what it was sent."""

    system_prompt = None

    def __init__(self, max_turns: int = 3, fail: str | None = None) -> None:
        self.max_turns, self.fail = max_turns, fail
        self.actions: list[str] = []

    def reset(self, seed=None):
        self.actions = []
        if self.fail == "reset":
            raise KeyError("no such level")
        return f"start {seed}", {"seed": seed}

    def step(self, action):
        self.actions.append(action)
        turn = len(self.actions)
        if self.fail == "step":
            raise RuntimeError("the game crashed")
        if self.fail == "reward":
            return "ok", float("nan"), False, False, {}
        if self.fail == "observation":
            return 42, 0.0, False, False, {}
        return f"reply {turn}", float(turn), False, False, {"turn": turn}

    def close(self):
        pass


def make_agent(tiny_model_dir, tokenizer, cls=GRPO, **overrides):
    settings = {
        "model_name": str(tiny_model_dir),
        "batch_size": 4,
        "lr": 1e-2,
        "beta": 0.0,
        "max_output_tokens": 6,
        "gradient_checkpointing": False,
        "max_model_len": 256,
    }
    if cls is GRPO:
        settings["group_size"] = 2
    return cls(tokenizer.pad_token_id, tokenizer.pad_token, **(settings | overrides))


def runs(mask_row: torch.Tensor) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values: (value, start, stop)."""
    out, start = [], 0
    values = mask_row.tolist()
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            out.append((values[start], start, index))
            start = index
    return out


def test_a_user_env_satisfies_the_protocol():
    assert all(isinstance(env, MultiTurnEnv) for env in (ScriptedEnv(), GuessTheNumber(), RecallTheSequence()))


def test_environment_tokens_are_never_in_the_action_mask(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    envs = [ScriptedEnv() for _ in range(4)]
    batch = collect_episodes(agent, envs, [3, 3, 5, 5], tokenizer, training=True)
    for row, env in enumerate(envs):
        length = int(batch.attention_mask[row].sum())
        generated = torch.cat([torch.tensor([False]), batch.action_mask[row]])[:length]
        ids = batch.completion_ids[row, :length]
        pieces = runs(generated)
        env_runs = [tokenizer.decode(ids[a:b]) for is_action, a, b in pieces if not is_action]
        action_runs = [ids[a:b].tolist() for is_action, a, b in pieces if is_action]
        assert len(action_runs) == len(env.actions) == 3  # never ends early: every turn played
        assert env_runs[0] == f"<|user|>start {[3, 3, 5, 5][row]}{EOS}<|assistant|>"
        for turn, action in enumerate(action_runs):
            stopped = tokenizer.decode(action[-1:]) == EOS
            # what the env was sent is exactly the generated tokens, decoded (the stop token left out)
            assert tokenizer.decode(action[:-1] if stopped else action, skip_special_tokens=True) == env.actions[turn]
            if turn + 1 < len(action_runs):
                closing = "" if stopped else EOS  # the template's closing, minus what the model wrote itself
                assert env_runs[turn + 1] == f"{closing}<|user|>reply {turn + 1}{EOS}<|assistant|>"
        assert len(env_runs) == 3  # the last action ends the row: no environment tokens after it


def test_turn_ids_and_per_turn_rewards_line_up_with_the_tokens(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    batch = collect_episodes(agent, [ScriptedEnv(), ScriptedEnv()], [0, 1], tokenizer)
    assert batch.turn_rewards.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    assert batch.returns.tolist() == [6.0, 6.0]
    assert torch.equal(batch.turn_ids >= 0, batch.action_mask)  # turn ids exactly on action tokens
    for row in range(2):
        action_runs = [(a, b) for is_action, a, b in runs(batch.action_mask[row]) if is_action]
        for turn, (a, b) in enumerate(action_runs):
            assert set(batch.turn_ids[row, a:b].tolist()) == {turn}
    assert not batch.truncated.any()


def test_an_episode_that_ends_early_stops_generating(tiny_model_dir, tokenizer):
    class EndsAtTurn(ScriptedEnv):
        def __init__(self, last):
            super().__init__(max_turns=4)
            self.last = last

        def step(self, action):
            observation, reward, _, _, info = super().step(action)
            return observation, reward, len(self.actions) == self.last, False, info

    envs = [EndsAtTurn(1), EndsAtTurn(3)]
    batch = collect_episodes(make_agent(tiny_model_dir, tokenizer), envs, [0, 0], tokenizer)
    assert [len(env.actions) for env in envs] == [1, 3]
    assert batch.turn_rewards.tolist() == [[1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]
    assert int(batch.turn_ids[0].max()) == 0 and int(batch.turn_ids[1].max()) == 2


def test_context_overflow_truncates_the_episode_and_says_so(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, max_model_len=40)
    envs = [ScriptedEnv(max_turns=10)]
    batch = collect_episodes(agent, envs, [0], tokenizer)
    assert bool(batch.truncated[0]) and "max_model_len=40" in batch.infos[0]["truncated_by"]
    assert int(batch.attention_mask[0].sum()) <= 40 and len(envs[0].actions) < 10


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        ("reset", r"episode 1 \(seed 7\): env.reset raised KeyError"),
        ("step", r"episode 1 \(seed 7\), turn 0: env.step raised RuntimeError: the game crashed"),
        ("reward", r"episode 1 \(seed 7\), turn 0: env.step returned reward=nan"),
        ("observation", r"episode 1 \(seed 7\), turn 0: env.step returned an observation of type int"),
    ],
)
def test_a_misbehaving_env_stops_with_an_error_naming_the_episode_and_turn(tiny_model_dir, tokenizer, fail, message):
    envs = [ScriptedEnv(), ScriptedEnv(fail=fail)]
    with pytest.raises(MultiTurnEnvError, match=message):
        collect_episodes(make_agent(tiny_model_dir, tokenizer), envs, [7, 7], tokenizer)


def chat_tokenizer(style: str):
    """The tiny tokenizer with a Qwen2-style or Llama-3-style template and its end-of-turn token as eos."""
    tokenizer = build_tiny_tokenizer()
    if style == "qwen2":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.chat_template = (
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
    else:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
        )
        tokenizer.eos_token = "<|eot_id|>"
        tokenizer.chat_template = (
            "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']"
            " + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        )
    return tokenizer


@pytest.mark.parametrize(
    ("style", "after_stop", "after_cut"),
    [
        (
            "qwen2",
            "\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n",
            "<|im_end|>\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "llama",
            "<|start_header_id|>user<|end_header_id|>\n\nhigher<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhigher<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    ],
)
def test_the_turn_boundary_follows_the_chat_template(style, after_stop, after_cut):
    tokenizer = chat_tokenizer(style)
    turns = ChatTurns(tokenizer)
    history = [{"role": "user", "content": "guess"}, {"role": "assistant", "content": "4"}]
    observation = [{"role": "user", "content": "higher"}]
    stopped = turns.environment_ids(history, observation, tokenizer.eos_token)
    cut = turns.environment_ids(history, observation, None)
    assert tokenizer.decode(stopped) == after_stop
    assert tokenizer.decode(cut) == after_cut
    # the whole episode's ids equal the template's rendering of the conversation, token for token
    opening = turns.opening_ids(history[:1])
    action = tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    full = opening + action + stopped
    rendered = turns.render([*history, *observation], add_generation_prompt=True)
    assert full == tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("level", ["token", "turn"])
def test_grpo_learns_from_multi_turn_episodes(tiny_model_dir, tokenizer, level):
    agent = make_agent(tiny_model_dir, tokenizer, importance_sampling_level=level, advantage_granularity="turn")
    envs = [GuessTheNumber(high=4, max_turns=3) for _ in range(4)]
    batch = collect_episodes(agent, envs, [1, 1, 2, 2], tokenizer)
    rewards = batch.turn_rewards + torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    before = [p.detach().clone() for p in agent.adapters.parameters("actor")]
    metrics = agent.learn(
        (batch.completion_ids, batch.action_mask, rewards, batch.attention_mask), turn_ids=batch.turn_ids
    )
    assert all(math.isfinite(value) for value in metrics.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, agent.adapters.parameters("actor"), strict=True))


def test_reinforce_learns_from_the_episode_return(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, cls=LLMReinforce)
    envs = [ScriptedEnv(max_turns=2) for _ in range(4)]
    batch = collect_episodes(agent, envs, [0, 1, 2, 3], tokenizer)
    rewards = batch.turn_rewards * torch.tensor([[1.0], [-1.0], [0.5], [0.0]])
    metrics = agent.learn((batch.completion_ids, batch.action_mask, rewards, batch.attention_mask))
    assert metrics["grad_norm"] > 0


def test_ppo_puts_each_turn_reward_on_its_last_token_and_learns(tiny_model_dir, tokenizer):
    """With turn_ids, GAE sees each turn's reward where the turn ends: the returns of a turn's tokens differ from
    the summed-at-the-end placement exactly by the later turns' rewards (gamma = lambda = 1)."""
    from agilerl_llm.advantages import gae, kl_penalised_token_rewards

    agent = make_agent(tiny_model_dir, tokenizer, cls=LLMPPO, gamma=1.0, gae_lambda=1.0)
    envs = [ScriptedEnv(max_turns=3) for _ in range(4)]
    batch = collect_episodes(agent, envs, [0, 1, 2, 3], tokenizer)
    mask, zeros = batch.action_mask, torch.zeros(batch.action_mask.shape)
    per_turn = kl_penalised_token_rewards(batch.turn_rewards, mask, turn_ids=batch.turn_ids)
    _, returns = gae(per_turn, zeros, mask, 1.0, 1.0)
    for row in range(4):
        for turn in range(3):
            tokens = mask[row] & (batch.turn_ids[row] == turn)
            # ScriptedEnv rewards turn k with k + 1: the return from turn k on is the sum of the rewards to come
            expected = float(batch.turn_rewards[row, turn:].sum())
            assert torch.allclose(returns[row][tokens], torch.full((int(tokens.sum()),), expected)), (row, turn)
    before = [p.detach().clone() for p in agent.adapters.parameters("actor")]
    metrics = agent.learn(batch.experience(), turn_ids=batch.turn_ids)
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["return_mean"] == pytest.approx(float(returns[mask].mean()), rel=1e-5)  # learn() placed them so
    assert any(not torch.equal(a, p) for a, p in zip(before, agent.adapters.parameters("actor"), strict=True))


def test_guess_the_number_rewards_fewer_turns():
    env = GuessTheNumber(low=1, high=8, max_turns=4)
    _, info = env.reset(seed=3)
    target = info["target"]
    assert env.reset(seed=3)[1]["target"] == target  # the seed fixes the secret
    wrong = 1 if target != 1 else 2
    reply, reward, terminated, truncated, _ = env.step(str(wrong))
    assert (reply, reward, terminated) == ("higher" if wrong < target else "lower", 0.0, False)
    assert env.step("no idea")[:3] == ("Answer with a number.", 0.0, False)
    _, reward, terminated, truncated, info = env.step(f"It is {target}")
    assert terminated and not truncated and info["success"] and reward == pytest.approx(0.8)
    env.reset(seed=3)
    assert env.step(str(target))[1] == 1.0
    env.reset(seed=3)
    for _ in range(3):
        env.step(str(wrong))
    assert env.step(str(wrong))[3]  # the fourth miss truncates the episode


def test_guess_the_number_can_reply_with_the_range_and_pay_for_consistent_guesses():
    env = GuessTheNumber(low=1, high=8, max_turns=4, reply="range", consistent_guess_reward=0.1)
    env.reset(seed=0)
    env.target = 6
    assert env.step("3")[:2] == ("higher: from 4 to 8", 0.1)  # allowed by the (empty) history: paid
    assert env.step("2")[:2] == ("higher: from 4 to 8", 0.0)  # already ruled out: not paid, range unchanged
    assert env.step("7")[:2] == ("lower: from 4 to 6", 0.1)
    _, reward, terminated, _, info = env.step("6")
    assert terminated and info["success"] and reward == pytest.approx(0.7)  # the win pays as before, no bonus
    with pytest.raises(ValueError, match="reply="):
        GuessTheNumber(reply="hints")
    with pytest.raises(ValueError, match="consistent_guess_reward"):
        GuessTheNumber(consistent_guess_reward=1.0)


def adapters_of(agent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in agent.adapters.state_dict("actor").items()}


def test_finetune_llm_multiturn_trains_evaluates_and_resumes_exactly(tiny_model_dir, tokenizer, tmp_path):
    from agilerl_llm import finetune_llm_multiturn
    from agilerl_llm.checkpoint.run import CheckpointConfig

    def run(path, max_steps, resume):
        agent = make_agent(tiny_model_dir, tokenizer, seed=4)
        config = CheckpointConfig(path=str(path), interval=2, resume=resume)
        pop, history = finetune_llm_multiturn(
            [agent], lambda: GuessTheNumber(high=4, max_turns=3), tokenizer, max_steps=max_steps,
            episodes_per_step=2, eval_seeds=[100, 101, 102], evaluation_interval=2, progress=False,
            checkpoint=config,
        )  # fmt: skip
        return pop[0], history

    straight, history = run(tmp_path / "straight", 4, "none")
    assert {row["step"] for row in history} == {0, 1, 2, 3, 4}
    assert all(0.0 <= row["eval/success"] <= 1.0 for row in history if "eval/success" in row)
    assert straight.fitness  # evaluation ranks members by their held-out return
    run(tmp_path / "resumed", 2, "none")
    resumed, resumed_history = run(tmp_path / "resumed", 4, "latest")
    assert {row["step"] for row in resumed_history} == {3, 4}
    for key, value in adapters_of(straight).items():
        assert torch.equal(value, adapters_of(resumed)[key]), key
    last = [row for row in history if row["step"] == 4][-1]
    assert last["reward/mean"] == [row for row in resumed_history if row["step"] == 4][-1]["reward/mean"]


def test_agent_test_plays_a_multi_turn_env_greedily(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    env = GuessTheNumber(high=4, max_turns=2)
    first = agent.test(env, tokenizer=tokenizer, seeds=[0, 1, 2])
    assert first.shape == (3,) and agent.fitness[-1] == pytest.approx(float(first.mean()))
    assert torch.equal(agent.test(env, tokenizer=tokenizer, seeds=[0, 1, 2]), first)  # greedy: repeatable
    with pytest.raises(ValueError, match="tokenizer="):
        agent.test(env)


def test_recall_the_sequence_deals_one_digit_a_turn_and_ends_on_a_wrong_answer():
    env = RecallTheSequence(max_turns=3, num_symbols=10)
    observation, info = env.reset(seed=5)
    sequence = info["sequence"]
    assert env.reset(seed=5)[1]["sequence"] == sequence and len(sequence) == 3  # the seed fixes the digits
    assert observation == f"Remember {sequence[0]}."
    reply, reward, terminated, truncated, _ = env.step(f"It is {sequence[0]}")
    assert (reply, reward, terminated, truncated) == (f"Next {sequence[1]}.", pytest.approx(1 / 3), False, False)
    reply, reward, terminated, _, _ = env.step(" ".join(sequence[:2]))  # only the digits of an answer count
    assert (reply, terminated) == (f"Next {sequence[2]}.", False)
    _, reward, terminated, _, info = env.step(sequence)
    assert terminated and info["success"] and reward == pytest.approx(1 / 3)
    env.reset(seed=5)
    wrong = str((int(sequence[0]) + 1) % 10)
    reply, reward, terminated, _, info = env.step(wrong)
    assert (reply, reward, terminated, info["success"]) == (f"Wrong, it was {sequence[0]}.", 0.0, True, False)
    env.reset(seed=5)
    env.step(sequence[0])
    assert env.step(sequence[1])[2]  # the answer must repeat every digit so far, not only the newest
    assert {RecallTheSequence(num_symbols=2).reset(seed=s)[1]["sequence"][0] for s in range(20)} == {"0", "1"}
    with pytest.raises(ValueError, match="num_symbols"):
        RecallTheSequence(num_symbols=11)
    with pytest.raises(ValueError, match="max_turns"):
        RecallTheSequence(max_turns=0)


def test_recall_demonstrations_answer_right_or_only_in_format():
    right, formatted = recall_policy("recall"), recall_policy("random", num_symbols=4)
    rng = random.Random(0)
    for seed in range(5):
        env = RecallTheSequence(max_turns=3, num_symbols=4)
        observation, info = env.reset(seed=seed)
        messages = [{"role": "user", "content": observation}]
        for turn in range(3):
            guess = formatted(messages, rng)
            assert len(guess) == turn + 1 and set(guess) <= set("0123")
            answer = right(messages, rng)
            reply, _, terminated, _, step_info = env.step(answer)
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": reply}]
        assert terminated and step_info["success"] and answer == info["sequence"]
    with pytest.raises(ValueError, match="strategy"):
        recall_policy("cheat")
