"""The cached module-tree walk: parameter names and train/eval switches follow every change to the tree."""

from __future__ import annotations

import torch
from helpers import tiny_grpo

from agilerl_llm.model import module_tree


def test_the_parameter_cache_follows_changes_to_the_module_tree():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    named = module_tree.named_parameters(model)
    assert named == dict(model.named_parameters())
    assert module_tree.named_parameters(model) is named  # unchanged: cached

    model[0].weight = torch.nn.Parameter(torch.zeros(3, 2))  # a parameter replaced
    assert module_tree.named_parameters(model)["0.weight"] is model[0].weight
    model[1] = torch.nn.Linear(3, 4)  # a submodule replaced
    assert module_tree.named_parameters(model)["1.weight"] is model[1].weight
    model.append(torch.nn.Linear(4, 1))  # a submodule added
    assert "2.bias" in module_tree.named_parameters(model)
    model[2].bias = None  # a parameter removed
    assert module_tree.named_parameters(model) == dict(model.named_parameters())
    model[0]._parameters["bias"] = torch.nn.Parameter(torch.ones(3))  # written directly, past the setattr path
    assert module_tree.named_parameters(model)["0.bias"] is model[0].bias
    assert module_tree.named_parameters(model) == dict(model.named_parameters())


def _modes(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_set_training_sets_every_module_of_a_peft_model_as_train_does(tiny_model_dir, tokenizer):
    actor = tiny_grpo(tiny_model_dir, tokenizer).actor
    for mode in (True, False, True):
        module_tree.set_training(actor, mode)
        assert _modes(actor) == [mode] * len(_modes(actor))
    torch.nn.Module.train(actor, False)  # the reference walk agrees after any mix of the two
    module_tree.set_training(actor, True)
    assert all(_modes(actor))


def test_set_training_reaches_modules_added_after_the_tree_was_cached():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    module_tree.set_training(model, False)
    model.append(torch.nn.Sequential(torch.nn.Dropout(0.5)))  # comes in training mode
    module_tree.set_training(model, False)
    assert not any(_modes(model))
    x = torch.ones(4, 2)
    assert torch.equal(model(x), model(x))  # every dropout is off
    module_tree.set_training(model, True)
    assert all(_modes(model))


class _Counting(torch.nn.Linear):
    calls: list[bool]

    def train(self, mode: bool = True):  # an override that does more than set the flag
        self.calls.append(mode)
        return super().train(mode)


def test_a_module_that_overrides_train_gets_its_own_train_called():
    inner = _Counting(2, 2)
    inner.calls = []
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), inner)
    module_tree.set_training(model, False)
    module_tree.set_training(model, True)
    assert inner.calls == [False, True]
    assert all(_modes(model))
