"""The multi-turn run config and job: the `multiturn:` section, `agilerl-llm train` on it, user environments given
as "module:factory", the scripted warm-start demonstrations, and the errors a bad section gets."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import yaml

from agilerl_llm.cli import main as cli_main
from agilerl_llm.envs.multiturn import ChatTurns
from agilerl_llm.envs.tasks import MULTITURN_ENVS
from agilerl_llm.envs.tasks.guess_number import GuessTheNumber, demonstration_policy, remaining_range
from agilerl_llm.envs.tasks.recall import RecallTheSequence
from agilerl_llm.testing import build_tiny_tokenizer
from agilerl_llm.training.config import ConfigError, RunConfig
from agilerl_llm.training.multiturn_job import demonstrations_for, env_factory, run_multiturn_job
from agilerl_llm.training.warmstart import episode_demonstrations

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "multiturn.yaml"

# A short run of configs/multiturn.yaml: small enough for the suite, every stage real.
SMOKE = [
    "training.max_steps=2",
    "training.evaluation_interval=2",
    "warm_start.steps=3",
    "multiturn.episodes_per_step=2",
    "multiturn.num_eval_episodes=4",
    "multiturn.env_kwargs={low: 1, high: 4, max_turns: 2}",
    "algorithm.params.group_size=2",
    "algorithm.params.batch_size=4",
    "logging.progress=false",
]

USER_ENV = '''
class Echo:
    """Say the word the environment names; one point per turn."""

    system_prompt = "Repeat the word."
    max_turns = 2

    def __init__(self, word="cat"):
        self.word = word

    def reset(self, seed=None):
        return f"Say {self.word}.", {}

    def step(self, action):
        won = self.word in action
        return ("Yes." if won else "No."), float(won), False, False, {"success": won}

    def close(self):
        pass


def make(word="cat"):
    return Echo(word)


def not_an_env():
    return 42
'''


@pytest.fixture()
def user_env_module(tmp_path, monkeypatch):
    (tmp_path / "my_games.py").write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_games"
    sys.modules.pop("my_games", None)


def test_the_shipped_multiturn_config_builds_its_environment():
    config = RunConfig.from_yaml(CONFIG)
    env = env_factory(config.multiturn)()
    assert isinstance(env, GuessTheNumber) and (env.low, env.high, env.max_turns) == (1, 8, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"task": {"name": "sort"}, "multiturn": {}}, "task and multiturn are exclusive"),
        ({"multiturn": {"env": "chess"}}, r"multiturn\.env: .*unknown environment 'chess'.*guess_number"),
        ({"multiturn": {"eval_seed": 100}}, r"held-out seeds 100\.\.163 overlap the training seeds 0\.\.2399"),
        ({"multiturn": {"episodes_per_step": 0}}, r"multiturn\.episodes_per_step"),
        ({"multiturn": {"env_kwarg": {}}}, r"multiturn\.env_kwarg"),
    ],
)
def test_a_bad_multiturn_section_names_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(data)


def test_bad_env_kwargs_user_factories_and_warm_starts_fail_before_any_model_is_built(user_env_module, tmp_path):
    def config(**multiturn):
        return RunConfig.from_dict({"output_dir": str(tmp_path / "run"), "multiturn": multiturn})

    with pytest.raises(ConfigError, match=r"multiturn\.env_kwargs: guess_number rejected \{'hgh': 4\}"):
        run_multiturn_job(config(env_kwargs={"hgh": 4}))
    with pytest.raises(ConfigError, match=r"multiturn\.env: cannot load 'my_games:nowhere'"):
        run_multiturn_job(config(env=f"{user_env_module}:nowhere"))
    with pytest.raises(ConfigError, match=r"returned a int, not a MultiTurnEnv"):
        run_multiturn_job(config(env=f"{user_env_module}:not_an_env"))
    with pytest.raises(ConfigError, match=r"warm_start\.steps is 80 but multiturn\.env 'my_games:make' has no"):
        run_multiturn_job(config(env=f"{user_env_module}:make"))
    assert not (tmp_path / "run" / "base").exists()


def test_agilerl_llm_train_runs_the_multiturn_config(tmp_path, capsys):
    output = tmp_path / "run"
    assert cli_main(["train", str(CONFIG), f"output_dir={output}", *SMOKE]) == 0
    printed = capsys.readouterr().out
    assert "held-out success" in printed and "held-out exact answers" not in printed
    assert (output / "base" / "config.json").is_file()
    resolved = yaml.safe_load((output / "config.yaml").read_text())
    assert resolved["multiturn"]["env_kwargs"] == {"low": 1, "high": 4, "max_turns": 2}


def test_a_user_environment_trains_from_the_config(user_env_module, tmp_path):
    data = {
        "output_dir": str(tmp_path / "run"),
        "multiturn": {"env": f"{user_env_module}:make", "env_kwargs": {"word": "dog"}, "num_eval_episodes": 4},
        "warm_start": {"steps": 0},
        "algorithm": {"name": "GRPO", "params": {"group_size": 2, "batch_size": 4, "max_output_tokens": 4}},
    }
    config = RunConfig.from_dict(data, [o for o in SMOKE if o.split("=")[0].startswith(("training", "logging"))])
    result = run_multiturn_job(config)
    assert result.exact_label == "held-out success"
    assert 0.0 <= result.exact_before <= 1.0 and 0.0 <= result.exact_after <= 1.0
    steps = {row["step"] for row in result.history}
    assert steps == {0, 1, 2} and all(math.isfinite(row.get("reward/mean", 0.0)) for row in result.history)


def slow_remaining_range(messages, low, high):
    """Reference: the numbers in [low, high] that agree with every reply so far."""
    candidates = set(range(low, high + 1))
    for guess, reply in zip(messages, messages[1:], strict=False):
        if guess["role"] == "assistant" and reply["content"] in ("higher", "lower"):
            g = int(guess["content"])
            candidates = {n for n in candidates if (n > g if reply["content"] == "higher" else n < g)}
    return min(candidates), max(candidates)


def test_remaining_range_agrees_with_the_replies_and_bisection_always_wins():
    for target in range(1, 17):
        env = GuessTheNumber(low=1, high=16, max_turns=5)
        env.reset(seed=0)
        env.target = target
        policy, messages = demonstration_policy(1, 16, "bisect"), [{"role": "user", "content": "go"}]
        for _ in range(5):
            guess = policy(messages, random.Random(0))
            reply, _, terminated, _, info = env.step(guess)
            if terminated:
                break
            messages += [{"role": "assistant", "content": guess}, {"role": "user", "content": reply}]
            assert remaining_range(messages, 1, 16) == slow_remaining_range(messages, 1, 16)
            lo, hi = remaining_range(messages, 1, 16)
            assert lo <= target <= hi
        assert info["success"]  # 16 numbers: bisection finds any of them within the 5 guesses allowed
    consistent = demonstration_policy(1, 8, "consistent")
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "higher"},
    ]
    assert {int(consistent(messages, random.Random(s))) for s in range(50)} == {5, 6, 7, 8}
    with pytest.raises(ValueError, match="strategy="):
        demonstration_policy(strategy="psychic")


def test_episode_demonstrations_render_each_turn_as_the_collection_does():
    tokenizer = build_tiny_tokenizer()
    factory = lambda: MULTITURN_ENVS["guess_number"].make_env(low=1, high=8, max_turns=3)  # noqa: E731
    pairs = episode_demonstrations(tokenizer, factory, demonstration_policy(1, 8, "bisect"), [-1, -2, -3])
    turns = ChatTurns(tokenizer)
    first_prompt = turns.render([{"role": "user", "content": "Guess my number from 1 to 8."}], True)
    assert pairs[0] == (first_prompt, "4" + tokenizer.eos_token)
    later = [prompt for prompt, _ in pairs if prompt != first_prompt]
    assert later and all(prompt.startswith(first_prompt + "4") for prompt in later)
    # the second turn's prompt is token for token what the RL collection builds incrementally after the action "4"
    reply = "higher" if "higher" in later[0] else "lower"
    history = [{"role": "user", "content": "Guess my number from 1 to 8."}, {"role": "assistant", "content": "4"}]
    built = (
        turns.opening_ids(history[:1])
        + turns.encode("4")
        + [tokenizer.eos_token_id]
        + turns.environment_ids(history, [{"role": "user", "content": reply}], tokenizer.eos_token)
    )
    assert built == turns.encode(later[0])


def test_the_recall_game_runs_from_a_config_with_its_scripted_warm_start(tmp_path):
    """multiturn.env: recall builds RecallTheSequence from env_kwargs; the warm start plays recall_policy's right
    answers, and the job reports held-out success before and after."""
    overrides = [o for o in SMOKE if not o.startswith("multiturn.env_kwargs")]
    config = RunConfig.from_yaml(
        CONFIG,
        overrides
        + [
            "multiturn.env=recall",
            "multiturn.env_kwargs={max_turns: 2, num_symbols: 4}",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    env = env_factory(config.multiturn)()
    assert isinstance(env, RecallTheSequence) and (env.max_turns, env.num_symbols) == (2, 4)
    pairs = demonstrations_for(config, env_factory(config.multiturn))(build_tiny_tokenizer())
    assert len(pairs) >= 2 and all(answer.rstrip(build_tiny_tokenizer().eos_token).isdigit() for _, answer in pairs)
    result = run_multiturn_job(config)
    assert 0.0 <= result.exact_before <= 1.0 and 0.0 <= result.exact_after <= 1.0
    assert result.exact_label == "held-out success"
