"""The spec's population surface on a real tiny agent: mut, evolvable_attributes, network groups, space dims,
update_lr / reinit_optimizers with the spec's arguments, copy_attributes, population(...) and torch_compiler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from agilerl_llm import GRPO, LLMPPO, CosineLRScheduleConfig
from agilerl_llm.evolution.hyperparameters import HyperparameterConfig, RLParameter
from agilerl_llm.evolution.mutation import Mutations

PROMPT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
PROMPT_MASK = PROMPT_IDS != 0


def make_agent(tiny_model_dir, tokenizer, cls=GRPO, **kwargs):
    settings = {"group_size": 2, "batch_size": 4, "lr": 1e-2, "max_output_tokens": 4} | kwargs
    return cls(
        tokenizer.pad_token_id,
        tokenizer.pad_token,
        model_name=str(tiny_model_dir),
        gradient_checkpointing=False,
        seed=3,
        **settings,
    )


def learn_once(agent):
    """One GRPO update on a fixed sampled batch (the same rollout for any agent with the same weights and seed)."""
    torch.manual_seed(0)
    result = agent.get_action({"input_ids": PROMPT_IDS, "attention_mask": PROMPT_MASK.long()})
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return result, agent.learn((result.completion_ids, result.action_masks, rewards, result.attention_mask))


def test_mut_records_the_last_mutation_and_is_a_property(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer, hp_config=HyperparameterConfig(lr=RLParameter(1e-5, 1e-1)))
    assert agent.mut is None
    mutated = Mutations(no_mutation=0.0, rl_hp=1.0, mutate_elite=True, rand_seed=1).mutation([agent])[0]
    assert mutated.mut == "lr" and mutated.lr != 1e-2
    assert mutated.clone().mut == mutated.mut
    assert "mut" not in GRPO.inspect_attributes(mutated)  # what happened, not a hyperparameter


def test_evolvable_attributes_are_the_trained_networks_and_optimizer(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    attributes = agent.evolvable_attributes()
    assert attributes == {"actor": agent.actor, "optimizer": agent.optimizer}
    assert agent.evolvable_attributes(networks_only=True) == {"actor": agent.actor}
    ppo = make_agent(tiny_model_dir, tokenizer, cls=LLMPPO, batch_size=4)
    assert set(ppo.evolvable_attributes(networks_only=True)) == {"actor", "value_head"}
    assert ppo.evolvable_attributes()["value_head"] is ppo.value_head


def test_register_network_group_checks_the_network(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    agent.register_network_group(SimpleNamespace(eval_network="actor"))
    agent.register_network_group(SimpleNamespace(eval_network=agent.actor, shared_networks=None))
    assert agent.network_groups == ["actor", "actor"]
    with pytest.raises(ValueError, match=r"eval_network 'critic' is not one of this agent's networks.*\['actor'\]"):
        agent.register_network_group(SimpleNamespace(eval_network="critic"))
    with pytest.raises(TypeError, match="eval_network"):
        agent.register_network_group("actor")


def test_space_dims_follow_the_spaces_and_are_empty_for_prompts():
    assert GRPO.get_state_dim(None) == () and GRPO.get_action_dim(None) == ()
    assert GRPO.get_state_dim(SimpleNamespace(shape=(3, 4), n=None)) == (3, 4)
    assert GRPO.get_action_dim(SimpleNamespace(n=5)) == (5,)
    assert GRPO.get_state_dim([SimpleNamespace(shape=(2,)), SimpleNamespace(n=3)]) == (2, 3)
    with pytest.raises(TypeError, match="action_space: int has neither a shape nor n"):
        GRPO.get_action_dim(7)


def test_update_lr_with_the_spec_arguments(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    accelerator, scheduler = GRPO.update_lr(agent.optimizer, 3e-3)
    assert accelerator is None and scheduler is None
    assert [group["lr"] for group in agent.optimizer.param_groups] == [3e-3] * len(agent.optimizer.param_groups)
    marker = object()
    accelerator, scheduler = GRPO.update_lr(
        agent.optimizer, 2e-3, accelerator=marker, scheduler_config={"num_epochs": 10, "warmup_proportion": 0.5}
    )
    assert accelerator is marker and scheduler is not None
    assert agent.optimizer.param_groups[0]["initial_lr"] == 2e-3 and agent.optimizer.param_groups[0]["lr"] < 2e-3
    with pytest.raises(ValueError, match="lr has 2 values for an optimizer with 1 groups"):
        GRPO.update_lr(agent.optimizer, (1e-3, 2e-3))
    with pytest.raises(ValueError, match="lr must be > 0"):
        GRPO.update_lr(agent.optimizer, 0.0)
    assert isinstance(agent.cosine_lr_schedule_config, CosineLRScheduleConfig | None)


def test_reinit_optimizers_takes_the_optimizer_name(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    learn_once(agent)
    assert agent.optimizer.state
    agent.reinit_optimizers(SimpleNamespace(name="optimizer"))
    assert not agent.optimizer.state
    learn_once(agent)
    agent.reinit_optimizers()
    assert not agent.optimizer.state
    with pytest.raises(ValueError, match="no optimizer 'critic_optimizer'; this agent has one, named 'optimizer'"):
        agent.reinit_optimizers("critic_optimizer")


def test_copy_attributes_deep_copies_the_hyperparameters_only(tiny_model_dir, tokenizer):
    agent = make_agent(tiny_model_dir, tokenizer)
    agent.fitness.append(0.5)
    target = GRPO.copy_attributes(agent, object.__new__(GRPO))
    assert target.lr == agent.lr and target.fitness == [0.5] and target.fitness is not agent.fitness
    assert "actor" not in vars(target) and "optimizer" not in vars(target)


def test_population_takes_the_spec_arguments(tiny_model_dir, tokenizer):
    class Wrapper:
        def __init__(self, agent, tag):
            self.agent, self.tag = agent, tag

    settings = {"pad_token_id": tokenizer.pad_token_id, "pad_token": tokenizer.pad_token,
                "model_name": str(tiny_model_dir), "gradient_checkpointing": False, "group_size": 2}  # fmt: skip
    wrapped = GRPO.population(2, None, None, wrapper_cls=Wrapper, wrapper_kwargs={"tag": "x"}, **settings)
    assert [w.tag for w in wrapped] == ["x", "x"] and [w.agent.index for w in wrapped] == [0, 1]
    with pytest.raises(ValueError, match="takes no observation_space"):
        GRPO.population(2, observation_space=SimpleNamespace(shape=(3,)), **settings)
    with pytest.raises(ValueError, match="wrapper_kwargs were given without a wrapper_cls"):
        GRPO.population(2, wrapper_kwargs={"tag": "x"}, **settings)


def test_torch_compiler_rejects_a_mode_torch_does_not_have(tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="torch_compiler='fast' is not a torch.compile mode"):
        make_agent(tiny_model_dir, tokenizer, torch_compiler="fast")


def test_a_compiled_agent_learns_exactly_like_an_eager_one_and_clones_recompile(tiny_model_dir, tokenizer):
    eager = make_agent(tiny_model_dir, tokenizer)
    compiled = make_agent(tiny_model_dir, tokenizer, torch_compiler="default")
    assert type(compiled.policy_forward).__name__ == "OptimizedModule"
    assert type(eager.policy_forward).__name__ == "HiddenStatesModel"
    ids, mask = PROMPT_IDS, PROMPT_MASK
    torch.testing.assert_close(compiled.get_logprobs(ids, mask), eager.get_logprobs(ids, mask), rtol=1e-5, atol=1e-5)
    eager_result, eager_metrics = learn_once(eager)
    compiled_result, compiled_metrics = learn_once(compiled)
    assert torch.equal(eager_result.completion_ids, compiled_result.completion_ids)
    assert compiled_metrics["mean_loss"] == pytest.approx(eager_metrics["mean_loss"], rel=1e-4, abs=1e-6)
    eager_weights = dict(eager.actor.named_parameters())
    for name, parameter in compiled.actor.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, eager_weights[name], rtol=1e-3, atol=1e-5)  # one Adam step of 1e-2
    clone = compiled.clone(index=1)
    assert type(clone.policy_forward).__name__ == "OptimizedModule"
    assert clone.policy_forward is not compiled.policy_forward
    torch.testing.assert_close(clone.get_logprobs(ids, mask), compiled.get_logprobs(ids, mask), rtol=0, atol=0)
