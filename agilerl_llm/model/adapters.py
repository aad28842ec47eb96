"""Named LoRA adapters on one frozen base model: the only module that touches PEFT plumbing.

An agent's network is a single ``peft.PeftModel`` holding up to three adapters over the same frozen
base weights:

* ``actor``     the policy being trained (always present);
* ``reference`` a frozen snapshot of the actor that anchors the KL penalty (optional);
* ``critic``    the value model's adapter, trained alongside the actor (PPO only).

PEFT's ``set_adapter`` marks only the active adapter trainable. We want a fixed rule instead (actor and
critic always trainable, reference and base never), so that the optimizer's parameter set and the
gradient hooks of DDP / DeepSpeed do not change when the active adapter does; ``AdapterSet`` re-applies
that rule after every switch.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import save_file
from transformers import PreTrainedModel

from agilerl_llm.model.lean_lora import LeanLoraLinear, use_lean_lora_layers
from agilerl_llm.model.lora_scope import adapt_lora_config_for_model
from agilerl_llm.utils import write_fence

ACTOR = "actor"
REFERENCE = "reference"
CRITIC = "critic"
ADAPTER_NAMES = (ACTOR, REFERENCE, CRITIC)
TRAINABLE_ADAPTERS = frozenset({ACTOR, CRITIC})
# Largest total of base weights ``merged_for_sampling`` copies (beyond it, generation runs unmerged).
MERGED_SAMPLING_BUDGET_BYTES = 256 * 2**20

# LoRA config fields that change the adapter's weight shapes or what its weights mean. Two configs that
# agree on these can exchange adapter weights; any other difference (e.g. dropout) is harmless.
SHAPE_DEFINING_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "modules_to_save",
    "bias",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
)


def default_lora_config() -> LoraConfig:
    """Rank-16 LoRA on every linear layer except the lm_head, with no dropout.

    No dropout by default: with dropout the "old" log-probs of the rollout and the first training
    forward differ, so the importance ratio of the first update is not exactly 1.
    """
    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )


def lora_config_differences(saved: LoraConfig, live: LoraConfig) -> list[str]:
    """Names and values of the shape-defining fields on which two LoRA configs disagree."""
    differences = []
    for field in SHAPE_DEFINING_LORA_FIELDS:
        saved_value, live_value = _normalise(getattr(saved, field, None)), _normalise(getattr(live, field, None))
        if saved_value != live_value:
            differences.append(f"{field}: checkpoint={saved_value!r}, live={live_value!r}")
    return differences


def _normalise(value: object) -> object:
    # PEFT stores target_modules as a set or list depending on how the config was made.
    if isinstance(value, (set, list, tuple)):
        return sorted(value)
    return value


class AdapterSet:
    """A PEFT model with named adapters, and the rules for switching, freezing and copying them.

    Args:
        model: a HuggingFace causal LM, or a ``PeftModel`` whose active adapter becomes the actor.
        lora_config: LoRA settings for every adapter; ``None`` uses the PeftModel's own config, or
            ``default_lora_config()`` for a plain model.
        adapter_names: which adapters to create; must include "actor".
        target_scope: keep only the LoRA targets under this sub-module path (``lora_target_scope``; see
            ``model/lora_scope.py``); None adapts every module the config selects.
    """

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        lora_config: LoraConfig | None,
        adapter_names: tuple[str, ...],
        target_scope: str | None = None,
    ) -> None:
        unknown = [name for name in adapter_names if name not in ADAPTER_NAMES]
        if unknown or ACTOR not in adapter_names:
            raise ValueError(f"adapter_names={adapter_names!r} must include 'actor' and only use {ADAPTER_NAMES}.")
        initial_actor_weights = None
        if isinstance(model, PeftModel):
            if target_scope is not None:
                raise ValueError(
                    f"lora_target_scope={target_scope!r} cannot re-scope the LoRA adapter already on actor_network; "
                    "pass the base model (peft_model.unload()) with lora_config, or lora_target_scope=None."
                )
            model, lora_config, initial_actor_weights = _take_over_peft_model(model, lora_config)
        lora_config = lora_config if lora_config is not None else default_lora_config()
        if not isinstance(lora_config, LoraConfig):
            raise ValueError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}.")
        lora_config = adapt_lora_config_for_model(lora_config, model, target_scope)
        self.names = tuple(adapter_names)
        self.model = _attach(model, lora_config, self.names)
        if initial_actor_weights is not None:
            set_peft_model_state_dict(self.model, initial_actor_weights, adapter_name=ACTOR)
        self._index_modules()
        if REFERENCE in self.names:
            self.copy(ACTOR, REFERENCE)
        self.active = ACTOR
        self.activate(ACTOR)

    def _index_modules(self) -> None:
        """Find, once, the layers an adapter switch touches and each adapter's parameters: PEFT's own switching
        (``set_adapter``, ``disable_adapter``) walks every module of the model, and reports the model's status,
        at every call, which cost a tiny model a tenth of its training step."""
        self._switchable = [
            m for m in self.model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        ]
        self._by_adapter = self._parameters_by_adapter()
        self._layers_adapter: str | None = None  # the adapter the layers were last set to
        self._disabled = False
        self.shared_storage: set[str] = set()  # adapters whose tensors other sets hold too (copy_sharing_base)

    def copy_sharing_base(self) -> AdapterSet:
        """An adapter set on a deep copy of the PEFT model that keeps pointing at the same frozen base tensors
        (``clone()``: a population member costs its adapters).

        The trainable adapters are copied. The frozen reference adapter is shared too, copy-on-write: the copy gets
        its own Parameter objects over the same storage, and whichever set writes different values into it first
        (``set_reference_policy``, a checkpoint load) takes a private copy then (``own``). Until a member's
        reference moves, the population holds one reference.
        """
        memo = {id(p): p for name, p in self.model.named_parameters() if "lora_" not in name}
        frozen = set(self.names) - TRAINABLE_ADAPTERS
        for name in frozen:
            for parameter in self._by_adapter[name]:
                memo[id(parameter)] = torch.nn.Parameter(parameter.data, requires_grad=False)
        copied = copy.deepcopy(self.model, memo=memo)
        for (name, original), (_, new) in zip(self.model.named_parameters(), copied.named_parameters(), strict=True):
            if (original is new) == ("lora_" in name):  # the base must be shared, every adapter Parameter copied
                raise RuntimeError(f"clone(): parameter {name} is {'shared' if original is new else 'copied'}.")
        result = copy.copy(self)
        result.model = copied
        result._index_modules()
        result.activate(self.active)
        self.shared_storage = self.shared_storage | frozen
        result.shared_storage = set(self.shared_storage)
        return result

    def own(self, name: str) -> None:
        """Give adapter ``name`` storage of its own if it shares it with another set (before writing into it)."""
        if name in self.shared_storage:
            for parameter in self._by_adapter[name]:
                parameter.data = parameter.data.clone()
            self.shared_storage = self.shared_storage - {name}

    def _holds(self, name: str, weights: dict[str, torch.Tensor]) -> bool:
        """Whether adapter ``name`` already holds exactly ``weights`` (keyed as ``state_dict`` returns them)."""
        current = self.state_dict(name)
        return current.keys() == weights.keys() and all(
            torch.equal(current[key], tensor.to(current[key].device)) for key, tensor in weights.items()
        )

    @property
    def lora_config(self) -> LoraConfig:
        """The live LoRA config (as PEFT resolved it, e.g. 'all-linear' expanded to module names)."""
        return self.model.peft_config[ACTOR]

    # ----------------------------------------------------------------------------------------- switching
    def check_name(self, name: str) -> None:
        """Raise ``ValueError`` naming the argument when ``name`` is not an adapter of this set."""
        if name not in self.names:
            raise ValueError(f"adapter_name={name!r} is not an adapter of this agent; it has {list(self.names)}.")

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter used by forward passes; actor/critic stay trainable, the rest frozen."""
        self.check_name(name)
        if name != self._layers_adapter:
            for module in self._switchable:
                module.set_adapter(name)  # also sets requires_grad in that layer; our rule is applied below
            self.model.base_model.active_adapter = name
            self._layers_adapter = name
        self.active = name
        for adapter, parameters in self._by_adapter.items():
            for parameter in parameters:
                parameter.requires_grad_(adapter in TRAINABLE_ADAPTERS)

    @contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Run a block with ``name`` active, then restore the adapter that was active before."""
        previous = self.active
        self.activate(name)
        try:
            yield
        finally:
            self.activate(previous)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run a block on the bare base model (every adapter bypassed)."""
        outermost = not self._disabled
        if outermost:
            for module in self._switchable:
                module.enable_adapters(False)
            self._disabled = True
        try:
            yield
        finally:
            if outermost:
                for module in self._switchable:
                    module.enable_adapters(True)
                self._disabled = False

    @contextmanager
    @torch.no_grad()
    def merged_for_sampling(self, budget_bytes: int = MERGED_SAMPLING_BUDGET_BYTES) -> Iterator[None]:
        """Run a no-grad block (generation) with the active adapter folded into temporary weight copies.

        Each plain LoRA linear layer then runs one matmul with ``W + scaling * B @ A`` instead of the base matmul
        plus the two adapter matmuls and PEFT's per-call bookkeeping: on a small model that is most of the cost of a
        decoding step. The base weights are never modified (a population shares them), and the copies are dropped
        on exit. The output equals the unmerged layer's up to float rounding, so the sampled tokens come from the
        same policy; the log-probs used for learning are always computed unmerged.

        Left unmerged: layers with dropout in training mode, LoRA variants (DoRA, ...), non-float (quantized) or
        ZeRO-3-partitioned base weights, and every layer when the copies would exceed ``budget_bytes`` (on a large
        model the adapter matmuls are a small share of the step and the copies would cost memory).
        """
        layers = [layer for layer in self._switchable if _mergeable(layer, self.active)] if not self._disabled else []
        if sum(layer.base_layer.weight.nbytes for layer in layers) > budget_bytes:
            layers = []
        for layer in layers:
            base = layer.base_layer
            merged = base.weight + layer.get_delta_weight(self.active).to(base.weight.dtype)
            layer.forward = functools.partial(_merged_linear, weight=merged, bias=base.bias)
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward  # back to the class's forward

    # ----------------------------------------------------------------------------------------- weights
    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT's adapter-agnostic key names (as saved by save_pretrained)."""
        self.check_name(name)
        return get_peft_model_state_dict(self.model, adapter_name=name)

    def load_state_dict(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """Load weights keyed as ``state_dict`` returns them into adapter ``name``; every key must match."""
        self.check_name(name)
        expected = self.state_dict(name)
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"Adapter weights for {name!r} do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
        for key, tensor in weights.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"Adapter weight {key!r} for {name!r} has shape {tuple(tensor.shape)} but the live adapter has "
                    f"{tuple(expected[key].shape)}: the checkpoint was made for another base model or LoRA rank."
                )
        write_fence.fence()  # an async checkpoint may still be copying these weights
        if name in self.shared_storage:
            if self._holds(name, weights):
                return  # a clone loading what it shares already: it stays shared
            self.own(name)
        set_peft_model_state_dict(self.model, weights, adapter_name=name)
        # set_peft_model_state_dict may touch requires_grad; restore our rule.
        self.activate(self.active)

    def save_base(self, folder: Path) -> None:
        """Write the frozen base model (no adapter weights) as a ``save_pretrained``-style folder: config,
        generation config and ``model.safetensors``. For an engine that loads the base itself (vLLM)."""
        base = self.model.get_base_model()
        weights = {}
        for key, tensor in base.state_dict().items():
            if "lora_" in key:
                continue
            weights[key.replace(".base_layer.", ".")] = tensor.detach().contiguous()
        if getattr(base.config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)  # stored once, as the input embedding
        folder.mkdir(parents=True, exist_ok=True)
        base.config.save_pretrained(folder)
        if base.generation_config is not None:
            base.generation_config.save_pretrained(folder)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    @torch.no_grad()
    def copy(self, source: str, target: str) -> None:
        """Overwrite adapter ``target``'s weights with ``source``'s (e.g. actor -> reference)."""
        self.check_name(source)
        self.check_name(target)
        write_fence.fence()  # an async checkpoint may still be copying the target's weights
        if target in self.shared_storage:
            if self._holds(target, self.state_dict(source)):
                return
            self.own(target)
        named = dict(self.model.named_parameters())
        for parameter_name, parameter in named.items():
            if f".{source}." in parameter_name:
                named[parameter_name.replace(f".{source}.", f".{target}.")].copy_(parameter)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The adapter's own parameters, in a stable order."""
        self.check_name(name)
        return self._by_adapter[name]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer owns: the actor's, then the critic's when present."""
        return [p for name in self.names if name in TRAINABLE_ADAPTERS for p in self.parameters(name)]

    def _parameters_by_adapter(self) -> dict[str, list[torch.nn.Parameter]]:
        grouped: dict[str, list[torch.nn.Parameter]] = {name: [] for name in self.names}
        for parameter_name, parameter in self.model.named_parameters():
            for name in self.names:
                if f".{name}." in parameter_name or parameter_name.endswith(f".{name}"):
                    grouped[name].append(parameter)
                    break
        return grouped


def _mergeable(layer: torch.nn.Module, adapter: str) -> bool:
    """Whether ``merged_for_sampling`` can fold ``adapter`` into this layer: a plain LoRA linear over a float,
    unpartitioned nn.Linear, adapter active, no variant, no dropout that would act."""
    if type(layer) not in (LoraLinear, LeanLoraLinear) or adapter not in layer.lora_A or adapter in layer.lora_variant:
        return False
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or not base.weight.is_floating_point() or hasattr(base.weight, "ds_id"):
        return False
    dropout = layer.lora_dropout[adapter]
    return not (layer.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0) and not layer.merged


def _merged_linear(x: torch.Tensor, *args: object, weight: torch.Tensor, bias: torch.Tensor | None, **kwargs: object):
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)


def _attach(model: PreTrainedModel, lora_config: LoraConfig, names: tuple[str, ...]) -> PeftModel:
    try:
        peft_model = get_peft_model(model, lora_config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, lora_config)
    except ValueError as error:
        if "not found in the base model" in str(error) or "Target module" in str(error):
            raise ValueError(
                f"lora_config.target_modules={lora_config.target_modules!r} matches no module of this model "
                f"({type(model).__name__}); name its linear layers (e.g. 'q_proj', 'v_proj') or use 'all-linear'."
            ) from error
        raise
    for parameter_name, parameter in peft_model.named_parameters():
        if "lora_" not in parameter_name:
            parameter.requires_grad_(False)
    use_lean_lora_layers(peft_model)  # the same layers, with one fused matmul-add for the adapter (lean_lora.py)
    return peft_model


def _take_over_peft_model(
    peft_model: PeftModel, lora_config: LoraConfig | None
) -> tuple[PreTrainedModel, LoraConfig, dict[str, torch.Tensor]]:
    """Strip a user's PeftModel back to its base, keeping its active adapter's config and weights."""
    active = peft_model.active_adapter
    peft_config = peft_model.peft_config[active]
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"actor_network carries a {type(peft_config).__name__} adapter; only LoRA is supported.")
    if lora_config is not None and (differences := lora_config_differences(peft_config, lora_config)):
        raise ValueError(
            "lora_config disagrees with the LoRA adapter already on actor_network ("
            + "; ".join(differences).replace("checkpoint=", "actor_network=")
            + "). Pass lora_config=None to use the network's own config."
        )
    weights = {
        key: value.detach().clone() for key, value in get_peft_model_state_dict(peft_model, adapter_name=active).items()
    }
    base = peft_model.unload()
    return base, lora_config or peft_config, weights
