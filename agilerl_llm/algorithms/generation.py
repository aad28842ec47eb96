"""Generation and evaluation for ``LLMAlgorithm``: sampling settings, ``get_action`` and ``test``.

Completions come from the agent's ``rollout_engine`` (``rollout/base.py``: HuggingFace generate by default).

Kept apart from ``base.py`` so the base class stays about wiring (adapters, optimizer, cloning). The mixin
reads the agent's live attributes (``actor``, ``device``, ``group_size``, the sampling hyperparameters), so
a mutated temperature or group size takes effect at the next rollout.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from agilerl_llm.algorithms.arguments import refuse_extra_arguments
from agilerl_llm.envs.multiturn import MultiTurnEnv, collect_episodes
from agilerl_llm.envs.reasoning import PromptBatch, ReasoningGym
from agilerl_llm.model.adapters import ACTOR
from agilerl_llm.model.liger import require_liger
from agilerl_llm.rollout.base import ActionResult, RolloutEngine, SamplingSettings
from agilerl_llm.rollout.hf import HFRolloutEngine
from agilerl_llm.rollout.vllm import RolloutRequest, VLLMConfig, VLLMRolloutEngine


class RolloutCorrectionSettings(BaseModel):
    """The rollout-engine settings that are plain hyperparameters (checkpoints carry them)."""

    model_config = ConfigDict(extra="forbid")

    use_vllm: bool = False
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_cap: float = Field(default=2.0, gt=0.0)
    use_memory_efficient_params: bool = True


class GenerationMixin:
    """Rollouts and held-out evaluation with the actor adapter (mixed into ``LLMAlgorithm``)."""

    # Whether use_liger_loss changes this algorithm's update (GRPO's family and REINFORCE, through
    # updates.policy_gradient_step); the others warn that they keep the standard path.
    has_liger_path: ClassVar[bool] = True

    def _store_generation_settings(
        self,
        *,
        hf_generate_chunk_size: int | None,
        use_liger_loss: bool,
        use_vllm: bool = False,
        vllm_config: VLLMConfig | None = None,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_cap: float = 2.0,
        use_memory_efficient_params: bool = True,
        **sampling: object,
    ) -> None:
        """Validate and keep the rollout settings shared by every algorithm that generates (GRPO, REINFORCE, PPO)
        as plain attributes, so evolution can mutate them and checkpoints carry them; pick the rollout engine."""
        if hf_generate_chunk_size is not None and hf_generate_chunk_size < 1:
            raise ValueError(f"hf_generate_chunk_size must be >= 1 or None, got {hf_generate_chunk_size}.")
        if use_liger_loss:
            if self.has_liger_path:
                require_liger()  # fails here, naming the extra, rather than at the first update
            else:
                warnings.warn(
                    f"use_liger_loss=True: {type(self).__name__} has no Liger path yet; it uses the standard fused "
                    "path.",
                    UserWarning,
                    3,
                )
        if vllm_config is not None and not use_vllm:
            raise ValueError("vllm_config is given but use_vllm=False; pass use_vllm=True to generate with vLLM.")
        if vllm_config is not None and not isinstance(vllm_config, VLLMConfig):
            vllm_config = VLLMConfig(**dict(vllm_config))  # a mapping (run configs): validated field by field
        self.__dict__.update(SamplingSettings(**sampling).model_dump())
        self.__dict__.update(
            RolloutCorrectionSettings(
                use_vllm=use_vllm,
                vllm_importance_sampling_correction=vllm_importance_sampling_correction,
                vllm_importance_sampling_cap=vllm_importance_sampling_cap,
                use_memory_efficient_params=use_memory_efficient_params,
            ).model_dump()
        )
        self.hf_generate_chunk_size = hf_generate_chunk_size
        self.use_liger_loss = use_liger_loss
        self.vllm_config = vllm_config or (VLLMConfig() if use_vllm else None)
        self.rollout_engine: RolloutEngine = VLLMRolloutEngine(self.vllm_config) if use_vllm else HFRolloutEngine()

    def sampling_settings(self) -> SamplingSettings:
        """The training-rollout sampling settings, read from the (mutable) hyperparameter attributes."""
        names = SamplingSettings.model_fields
        missing = [name for name in names if not hasattr(self, name)]
        if missing:
            raise NotImplementedError(f"{type(self).__name__} does not generate completions (no {missing[0]}).")
        return SamplingSettings(**{name: getattr(self, name) for name in names})

    def get_action(
        self,
        obs: PromptBatch | dict[str, torch.Tensor],
        training: bool = True,
        repeat_prompts: bool = True,
        *args: Any,
        **kwargs: Any,
    ) -> ActionResult:
        """Completions for a batch of prompts, generated by the actor with gradients off.

        Args:
            obs: a ``PromptBatch`` (or a dict with left-padded ``input_ids`` and ``attention_mask``).
            training: sample with the training settings, ``group_size`` completions per prompt; otherwise
                decode one completion per prompt greedily.
            repeat_prompts: with ``training``, repeat each prompt ``group_size`` times; False treats every
                row as its own trajectory (one completion each).
            *args, **kwargs: in the spec's signature; any given is refused (TypeError), never ignored.
        """
        refuse_extra_arguments("get_action", args, kwargs, "obs, training, repeat_prompts")
        prompt_ids, prompt_mask = _prompt_tensors(obs)
        group_size = getattr(self, "group_size", 1) if training and repeat_prompts else 1
        self.set_training_mode(False)
        with self.select_adapter(ACTOR):
            return self.rollout_engine.generate(
                self,
                prompt_ids,
                prompt_mask,
                num_completions=group_size,
                sampling=self.sampling_settings(),
                do_sample=training,
            )

    def test(
        self,
        env: ReasoningGym | MultiTurnEnv,
        loop: int = 1,
        *args: Any,
        tokenizer: Any = None,
        seeds: list[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy completions for the whole held-out split, ``loop`` times; returns every reward.

        With a ``MultiTurnEnv``: greedy episodes, one per seed in ``seeds`` (default ``range(loop)``), each in a copy
        of ``env``, played in lock-step through ``tokenizer``'s chat template; returns each episode's return.

        Under several processes each rank scores its share of the split (``envs/sharding.py``) and the rewards
        are gathered, so every rank returns the same rewards, in test-split order, and appends the same fitness.
        The mean reward is appended to ``self.fitness``. ``*args`` / ``**kwargs`` are in the spec's signature; any
        given is refused (TypeError), never ignored.
        """
        refuse_extra_arguments("test", args, kwargs, "env, loop, and keywords tokenizer and seeds")
        if isinstance(env, MultiTurnEnv):
            return self._test_episodes(env, loop, tokenizer, seeds)
        rewards, sample_ids = [], []
        with env.eval_mode():
            for repeat in range(loop):
                prompts = env.reset()
                while prompts is not None:
                    ids = prompts.sample_ids or tuple(range(len(prompts)))
                    prompts, batch_rewards = env.step(self.get_action(prompts, training=False))
                    rewards.append(batch_rewards.flatten())
                    # a global key per row: the repeat, then the test-split index (-1: padding, not counted)
                    sample_ids.append(torch.tensor([i + repeat * len(env.test_dataset) if i >= 0 else -1 for i in ids]))
        all_rewards = torch.cat(rewards)
        if self.dist.world_size > 1:
            keys, all_rewards = self.dist.gather_rows(torch.cat(sample_ids)), self.dist.gather_rows(all_rewards)
            counted = keys >= 0
            all_rewards = all_rewards[counted][torch.argsort(keys[counted], stable=True)]
        self.fitness.append(float(all_rewards.mean()))
        return all_rewards

    def _test_episodes(self, env: MultiTurnEnv, loop: int, tokenizer: Any, seeds: list[int] | None) -> torch.Tensor:
        if tokenizer is None:
            raise ValueError(
                "test() on a MultiTurnEnv needs tokenizer= (episodes are built through its chat template)."
            )
        seeds = list(range(loop)) if seeds is None else list(seeds)
        envs = [copy.deepcopy(env) for _ in seeds]
        returns = collect_episodes(self, envs, seeds, tokenizer, training=False).returns
        self.fitness.append(float(returns.mean()))
        return returns


def _prompt_tensors(obs: PromptBatch | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(obs, PromptBatch):
        return obs.input_ids, obs.attention_mask
    return obs["input_ids"], obs["attention_mask"]


def population_actions(
    pop: list, obs: PromptBatch | dict[str, torch.Tensor], training: bool = True
) -> list[ActionResult]:
    """``agent.get_action(obs, training)`` for every member, in order, with one batched call per shared engine.

    Members whose engine batches across agents (vLLM: a population on one engine) are served by ONE
    ``generate_many`` call; the others (HuggingFace generate) one by one. Each member samples from its own actor.
    """
    results: dict[int, ActionResult] = {}
    groups: dict[int, list[int]] = {}
    for position, agent in enumerate(pop):
        engine = agent.rollout_engine
        if hasattr(engine, "generate_many"):
            groups.setdefault(id(engine), []).append(position)
        else:
            results[position] = agent.get_action(obs, training=training)
    prompt_ids, prompt_mask = _prompt_tensors(obs)
    for positions in groups.values():
        requests = [
            RolloutRequest(
                pop[p],
                prompt_ids,
                prompt_mask,
                getattr(pop[p], "group_size", 1) if training else 1,
                pop[p].sampling_settings(),
                training,
            )
            for p in positions
        ]
        for position, result in zip(positions, pop[positions[0]].rollout_engine.generate_many(requests), strict=True):
            results[position] = result
    return [results[position] for position in range(len(pop))]
