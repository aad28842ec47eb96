"""The rollout seam: every rollout goes through ``agent.rollout_engine``; the weights version tells an engine
with its own copy of the weights when to sync."""

from __future__ import annotations

import torch
from helpers import arithmetic_env, tiny_grpo

from agilerl_llm.rollout.hf import HFRolloutEngine


class CountingEngine(HFRolloutEngine):
    """The HuggingFace engine, syncing (as an engine with its own weights would) when the version moved."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.synced_version: int | None = None
        self.syncs = 0

    def generate(self, agent, prompt_ids, prompt_mask, *, num_completions, sampling, do_sample):
        if agent.weights_version != self.synced_version:
            self.sync(agent)
        self.calls.append((num_completions, do_sample))
        return super().generate(
            agent, prompt_ids, prompt_mask, num_completions=num_completions, sampling=sampling, do_sample=do_sample
        )

    def sync(self, agent) -> None:
        self.synced_version = agent.weights_version
        self.syncs += 1

    def for_clone(self, clone):
        return CountingEngine()


def test_get_action_and_test_go_through_the_engine_and_learning_bumps_the_version(tiny_model_dir, tokenizer, tmp_path):
    agent = tiny_grpo(tiny_model_dir, tokenizer, batch_size=4)  # 2 prompts x 2 completions: one optimizer step
    assert isinstance(agent.rollout_engine, HFRolloutEngine)  # the default
    engine = agent.rollout_engine = CountingEngine()
    env = arithmetic_env(tokenizer)
    prompts = env.reset()
    first = agent.get_action(prompts)
    assert engine.calls == [(2, True)] and engine.syncs == 1
    agent.get_action(prompts)
    assert engine.syncs == 1  # nothing changed: no sync

    version = agent.weights_version
    agent.learn((first.completion_ids, first.action_masks, torch.rand(len(prompts), 2)))
    assert agent.weights_version == version + 1  # one optimizer step
    agent.test(env)
    assert engine.calls[-1] == (1, False) and engine.syncs == 2  # greedy evaluation, after one sync

    agent.save_checkpoint(tmp_path / "ckpt")
    agent.load_checkpoint(tmp_path / "ckpt")
    assert agent.weights_version == version + 2  # a load changes the weights too
    agent.get_action(prompts)
    assert engine.syncs == 3

    clone = agent.clone(index=1)
    assert isinstance(clone.rollout_engine, CountingEngine) and clone.rollout_engine is not engine
