"""One walk over a model's module tree, cached while the tree is unchanged.

A PEFT model has hundreds to thousands of modules, and ``named_parameters()`` or ``train(mode)`` walks them in
Python every call: on a small model a switch between train and eval mode cost about 1% of a GRPO iteration, and
the names walk a few ms of each async checkpoint. ``ModuleTree`` records the walk once, and before each use checks
that no submodule or parameter was added, removed or replaced anywhere (a few C-level passes over the recorded
``_modules`` / ``_parameters`` dicts, several times cheaper than the walk).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel


@dataclass
class ModuleTree:
    """A module's submodules and ``named_parameters()``, and what they were read from: every ``_modules`` and
    ``_parameters`` dict met on the way, its size and its entries (no reference to the root module itself)."""

    modules: list[torch.nn.Module]  # the root's descendants, the root itself left out
    named: dict[str, torch.nn.Parameter]
    containers: list[dict[str, Any]]
    sizes: list[int]
    entry_containers: list[dict[str, Any]]
    entry_keys: list[str]
    entry_values: list[Any]  # held, so that their ids stay theirs
    entry_ids: list[int]

    @classmethod
    def read(cls, module: torch.nn.Module) -> ModuleTree:
        modules = list(module.modules())
        containers = [c for m in modules for c in (m._modules, m._parameters)]
        entries = [(c, k, v) for c in containers for k, v in c.items()]
        return cls(
            modules=modules[1:],
            named=dict(module.named_parameters()),
            containers=containers,
            sizes=list(map(len, containers)),
            entry_containers=[c for c, _, _ in entries],
            entry_keys=[k for _, k, _ in entries],
            entry_values=[v for _, _, v in entries],
            entry_ids=[id(v) for _, _, v in entries],
        )

    def holds(self) -> bool:
        """Whether the tree is unchanged: no submodule or parameter added, removed or replaced anywhere in it.
        (Compared by id: the cache holds every old entry, so no new object can have an old one's id.)"""
        return list(map(len, self.containers)) == self.sizes and (
            list(map(id, map(dict.get, self.entry_containers, self.entry_keys))) == self.entry_ids
        )


# root module -> its ModuleTree
_TREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def module_tree(module: torch.nn.Module) -> ModuleTree:
    """The cached ``ModuleTree`` of ``module``, read again when its tree has changed."""
    cached = _TREES.get(module)
    if cached is None or not cached.holds():
        cached = ModuleTree.read(module)
        _TREES[module] = cached
    return cached


def named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``dict(module.named_parameters())``, cached while the module tree is unchanged."""
    return module_tree(module).named


def set_training(module: torch.nn.Module, training: bool) -> None:
    """``module.train(training)``: every module's ``training`` flag set, from the cached tree.

    That is all ``nn.Module.train`` does. A module whose class overrides ``train`` may do more, so then the real
    ``module.train`` runs instead; transformers' override only re-applies kernels (``use_kernels``) and counts as
    plain while that is off."""
    if type(module).train is not torch.nn.Module.train and not _plain_train(module):
        module.train(training)
        return
    tree = module_tree(module)
    if not all(type(m).train is torch.nn.Module.train or _plain_train(m) for m in tree.modules):
        module.train(training)
        return
    object.__setattr__(module, "training", training)  # past nn.Module.__setattr__'s parameter/buffer checks
    for m in tree.modules:
        object.__setattr__(m, "training", training)


def _plain_train(module: torch.nn.Module) -> bool:
    return type(module).train is PreTrainedModel.train and not getattr(module, "use_kernels", False)
