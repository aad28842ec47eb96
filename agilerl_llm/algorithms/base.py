"""``LLMAlgorithm``: what every LLM fine-tuning algorithm stands on.

The base class wires collaborators together and computes nothing of its own:

* ``AdapterSet`` (model/adapters.py)   named LoRA adapters (actor, reference, critic) on ONE frozen base;
* ``HiddenStatesModel`` (model/forward.py)  the training forward, up to the final hidden states;
* ``fused_logprobs`` (model/logprobs.py)    chunked lm_head -> log-prob op, used for every log-prob;
* the optimizer and LR schedule (optim.py) over the trainable adapters only;
* ``Distributed`` (distributed.py): rank, collectives, backward and optimizer step on every backend
  (one process, data parallel, DeepSpeed ZeRO-2/3), so the algorithms read the same on all of them.

Generation (``GenerationMixin``, algorithms/generation.py) and the checkpoint methods (``CheckpointMixin``,
algorithms/checkpointing.py: ``checkpoint_state``, ``save_checkpoint``, ``load``, ...) are mixed in from their
own modules.

Subclasses say what to optimise: they implement ``learn`` (and ``get_action`` / ``test`` where they
generate). Constructor arguments follow the AgileRL LLM API names and defaults.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftModel
from pydantic import BaseModel
from transformers import PreTrainedModel

from agilerl_llm.algorithms.arguments import check_base_arguments
from agilerl_llm.algorithms.checkpointing import CheckpointMixin
from agilerl_llm.algorithms.evolvable import EvolvableMixin, check_compile_mode
from agilerl_llm.algorithms.generation import GenerationMixin
from agilerl_llm.checkpoint.state import lora_parameters
from agilerl_llm.distributed import Distributed
from agilerl_llm.evolution.hyperparameters import HyperparameterConfig, as_hyperparameter_config
from agilerl_llm.model.adapters import ACTOR, CRITIC, REFERENCE, AdapterSet
from agilerl_llm.model.forward import (
    HiddenStatesModel,
    attended_columns,
    decoder_of,
    enable_activation_checkpointing,
)
from agilerl_llm.model.liger_triton import apply_liger_model_patches, liger_token_logprobs
from agilerl_llm.model.loading import load_network
from agilerl_llm.model.logprobs import fused_logprobs
from agilerl_llm.model.module_tree import set_training
from agilerl_llm.model.packing import packing_unsupported_reason
from agilerl_llm.model.prefix_sharing import prefix_sharing_unsupported_reason, window_prefix
from agilerl_llm.model.quantization import (
    check_output_head_unquantized,
    check_quantization_config,
    is_quantized,
    prepare_quantized_base,
)
from agilerl_llm.model.sampling_logprobs import processed_logprobs
from agilerl_llm.optim import (
    CosineLRScheduleConfig,
    as_schedule_config,
    build_lr_scheduler,
    build_optimizer,
)
from agilerl_llm.rollout.base import SamplingSettings
from agilerl_llm.utils.notices import warn_once
from agilerl_llm.utils.seeding import seed_everything

logger = logging.getLogger(__name__)


class LLMAlgorithm(EvolvableMixin, GenerationMixin, CheckpointMixin):
    """Base class of the LLM algorithms: model + named LoRA adapters, optimizer, log-probs, cloning.

    Args:
        pad_token_id: id used to pad batches (may equal the eos id; masks never rely on it).
        pad_token: the pad token's text.
        model_name: path or name for ``AutoModelForCausalLM.from_pretrained`` (when no actor_network).
        actor_network: a HuggingFace causal LM, or a ``PeftModel`` whose active LoRA adapter becomes the actor.
        model_config: keyword arguments for ``from_pretrained`` when loading by ``model_name``.
        hp_config: hyperparameter mutation ranges (``HyperparameterConfig`` or a dict of its fields); None
            disables mutation. Every name must be a scalar attribute of the algorithm, inside its range.
        index: the agent's id in a population.
        batch_size: experiences per optimizer step on each process (the global batch is ``batch_size`` times the
            number of processes; see ``agilerl_llm.distributed``).
        lr: peak learning rate of AdamW on the adapters.
        max_grad_norm: gradient-norm clip; None disables clipping.
        micro_batch_size_per_gpu: rows per forward/backward; gradients accumulate over
            ``batch_size // micro_batch_size_per_gpu`` of them. None means one micro-batch per step.
        lora_config: LoRA settings for every adapter; None uses ``default_lora_config()``.
        cosine_lr_schedule_config: warm-up + cosine schedule; None keeps the lr constant.
        use_separate_reference_adapter: keep a frozen ``reference`` adapter for the KL anchor; when False the
            reference log-probs come from the base model with adapters disabled.
        accelerator: an ``accelerate.Accelerator`` for DDP / DeepSpeed; None for one plain process.
        device: "cpu" or "cuda" (ignored when an accelerator is given: its device is used).
        wrap: prepare the model and optimizer with the accelerator on construction.
        clone: internal; True when the instance is being built as a clone.
        seed: seeds python, numpy and torch on construction.
        gradient_checkpointing: recompute activations in backward to save memory.
        cast_logprobs_to_fp32: reduce log-probs in fp32 (see ``fused_logprobs``).
        fused_logprobs_chunk_rows: rows per logits tile in the fused op; None auto-sizes to ~128 MiB of fp32 logits.
        calc_position_embeddings: derive position ids from the attention mask (left padding).
        quantization_config: a ``transformers.BitsAndBytesConfig`` to load the base 4-bit or 8-bit (QLoRA); the
            lm_head stays in full precision. See ``model/quantization.py``.
        torch_compiler: a ``torch.compile`` mode for the training forward ("default", "reduce-overhead", ...);
            None runs it eagerly. Recompiled after cloning (``recompile``); not applied under DeepSpeed.
        lora_target_scope: adapt only the modules under this sub-module path of a composite model (for
            example "language_model" of a vision-language model); see ``model/lora_scope.py``.
        use_sequence_packing: run the training and scoring forwards padding-free, the batch's real tokens packed
            end to end (``model/packing.py``); checked once against the model, and left off with a message where
            the model or its attention backend cannot keep packed sequences apart.
    """

    uses_critic: ClassVar[bool] = False

    # The typed settings models whose fields are this algorithm's hyperparameters (validated on construction and
    # when a checkpoint restores them).
    hyperparameter_models: ClassVar[tuple[type[BaseModel], ...]] = ()

    def __init__(
        self,
        pad_token_id: int,
        pad_token: str,
        model_name: str | None = None,
        actor_network: PreTrainedModel | PeftModel | None = None,
        model_config: dict[str, Any] | None = None,
        hp_config: HyperparameterConfig | dict[str, Any] | None = None,
        index: int = 0,
        batch_size: int = 16,
        lr: float = 5e-7,
        max_grad_norm: float | None = 0.1,
        micro_batch_size_per_gpu: int | None = None,
        lora_config: LoraConfig | None = None,
        cosine_lr_schedule_config: CosineLRScheduleConfig | dict[str, Any] | None = None,
        use_separate_reference_adapter: bool = True,
        accelerator: Any | None = None,
        device: str = "cpu",
        wrap: bool = True,
        clone: bool = False,
        seed: int = 42,
        gradient_checkpointing: bool = True,
        cast_logprobs_to_fp32: bool = True,
        fused_logprobs_chunk_rows: int | None = None,
        calc_position_embeddings: bool = True,
        torch_compiler: str | None = None,
        quantization_config: Any | None = None,
        lora_target_scope: str | None = None,
        use_sequence_packing: bool = False,
    ) -> None:
        check_base_arguments(pad_token_id, batch_size, lr, max_grad_norm, micro_batch_size_per_gpu, index)
        if fused_logprobs_chunk_rows is not None and fused_logprobs_chunk_rows < 1:
            raise ValueError(f"fused_logprobs_chunk_rows must be >= 1 or None, got {fused_logprobs_chunk_rows}.")
        self.pad_token_id = pad_token_id
        self.pad_token = pad_token
        self.model_name = model_name
        self.hp_config = as_hyperparameter_config(hp_config)
        self._index = index
        self.batch_size = batch_size
        self.lr = lr
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size_per_gpu = micro_batch_size_per_gpu or batch_size
        self.cosine_lr_schedule_config = as_schedule_config(cosine_lr_schedule_config)
        self.use_separate_reference_adapter = use_separate_reference_adapter
        self.accelerator = accelerator
        self.dist = Distributed(accelerator)  # refuses a multi-process launch this accelerator cannot see
        self.engine: Any | None = None  # the DeepSpeed engine, once wrapped under DeepSpeed
        self.device = torch.device(accelerator.device if accelerator is not None else device)
        self.seed = seed
        self.gradient_checkpointing = gradient_checkpointing
        self.cast_logprobs_to_fp32 = cast_logprobs_to_fp32
        self.fused_logprobs_chunk_rows = fused_logprobs_chunk_rows
        self.calc_position_embeddings = calc_position_embeddings
        check_compile_mode(torch_compiler)
        self.torch_compiler = torch_compiler
        self.quantization_config = check_quantization_config(quantization_config)
        self.lora_target_scope = lora_target_scope
        if use_sequence_packing and not calc_position_embeddings:
            raise ValueError(
                "use_sequence_packing=True needs calc_position_embeddings=True: every packed sequence's positions "
                "restart at 0. Set calc_position_embeddings=True or use_sequence_packing=False."
            )
        self.use_sequence_packing = use_sequence_packing
        self.packs_sequences = False  # whether the training forward really packs (decided once the model exists)
        self.shares_prefixes = False  # whether a group's prompt is encoded once (decided once the model exists)
        if self.dist.zero_stage == 3 and (reason := self.zero3_refusal()):
            raise NotImplementedError(
                f"{type(self).__name__} does not run under DeepSpeed ZeRO-3 {reason} Or use data parallel "
                "(configs/accelerate/ddp.yaml) or ZeRO-2 (configs/accelerate/zero2.yaml)."
            )
        self.reference_update_tracker = 0
        # Bumped whenever the trainable weights change (an optimizer step, a checkpoint load): a rollout engine
        # with its own copy of the weights syncs when it last saw another version (rollout/base.py).
        self._weights_version = 0
        self.fitness: list[float] = []
        self.mutation_hooks: list[Callable[[], None]] = []
        if self.hp_config is not None:
            self.hp_config.check_agent(self)  # subclasses set their hyperparameters before calling us
        if clone:
            return  # clone() fills in the collaborators itself
        seed_everything(seed)
        network = load_network(actor_network, model_name, model_config, self.quantization_config)
        if is_quantized(network):
            check_output_head_unquantized(network)
            network = prepare_quantized_base(network)
        if gradient_checkpointing:
            enable_activation_checkpointing(network)
        self.liger_model_patches = apply_liger_model_patches(network, self.device)
        self.adapters = AdapterSet(network, lora_config, self.adapter_names(), lora_target_scope)
        self.actor = self.adapters.model.to(self.device)
        if use_sequence_packing:
            self.packs_sequences = self._check_sequence_packing()
        self.shares_prefixes = self._check_prefix_sharing()
        self.policy_forward = self.make_policy_forward(self.actor)
        self._build_optimizer()
        if "rollout_engine" in self.__dict__:
            self.rollout_engine.attach(self)
        if accelerator is not None and wrap:
            self.wrap_models()
        self.recompile()

    def zero3_refusal(self) -> str | None:
        """Why this agent, as configured, cannot run under DeepSpeed ZeRO-3 (None: it can)."""
        return None

    # ------------------------------------------------------------------------------------------ adapters
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters this algorithm keeps on its base model."""
        names = [ACTOR]
        if self.use_separate_reference_adapter:
            names.append(REFERENCE)
        if self.uses_critic:
            names.append(CRITIC)
        return tuple(names)

    @property
    def lora_config(self) -> LoraConfig:
        """The live LoRA config shared by all adapters."""
        return self.adapters.lora_config

    def use_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (reference stays frozen, actor/critic trainable)."""
        self.adapters.activate(adapter_name)

    @contextmanager
    def select_adapter(self, adapter_name: str) -> Iterator[None]:
        """Temporarily switch adapter; the actor is active again on exit."""
        try:
            with self.adapters.using(adapter_name):
                yield
        finally:
            self.adapters.activate(ACTOR)

    @contextmanager
    def _reference_policy(self) -> Iterator[None]:
        """The KL anchor: the reference adapter, or the bare base model when there is none."""
        if self.use_separate_reference_adapter:
            with self.adapters.using(REFERENCE):
                yield
        else:
            with self.adapters.disabled():
                yield

    def set_reference_policy(self, reference_update_tracker: int) -> None:
        """Copy the actor onto the reference once the tracker advances past the stored value."""
        if reference_update_tracker <= self.reference_update_tracker:
            return
        self.reference_update_tracker = reference_update_tracker
        if self.use_separate_reference_adapter:
            self.adapters.copy(ACTOR, REFERENCE)
        else:
            warn_once(
                "fixed_reference",
                "set_reference_policy has no effect without a separate reference adapter: the reference is the frozen "
                "base model. Pass use_separate_reference_adapter=True to move the KL anchor.",
            )

    # ------------------------------------------------------------------------------------------ log-probs
    def get_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        policy: str = ACTOR,
        temperature: float = 1.0,
        requires_grad: bool = False,
        return_entropy: bool = False,
        sampling: SamplingSettings | None = None,
        prefix_length: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of each next token: (B, S) ids -> (B, S-1) log-probs [, entropies].

        Args:
            policy: "actor", "critic", "reference" (the reference adapter, or the base when there is none)
                or "base" (adapters disabled).
            temperature: the logits are divided by it, matching how the tokens were sampled.
            requires_grad: keep the graph for backward (training forward); otherwise runs under no_grad in
                micro-batches of ``micro_batch_size_per_gpu`` rows.
            sampling: score under the sampling distribution instead (its temperature, then min-p, top-k and top-p,
                renormalised: ``model/sampling_logprobs.py``), as vLLM reports it; no grad, no entropy.
            prefix_length: columns that are prompt in every row (``shared_prefix_length`` of the action mask):
                rows with the same prompt then encode it once (``model/prefix_sharing.py``); None encodes each row.
        """
        if sampling is not None and (requires_grad or return_entropy):
            raise ValueError("get_logprobs(sampling=...) scores the sampling distribution without grad or entropy.")
        if requires_grad:
            with self._policy_context(policy):
                return self._forward_logprobs(
                    input_ids, attention_mask, temperature, return_entropy, prefix_length=prefix_length
                )
        chunks = []
        with torch.no_grad(), self._policy_context(policy):
            for start in range(0, input_ids.shape[0], self.micro_batch_size_per_gpu):
                rows = slice(start, start + self.micro_batch_size_per_gpu)
                chunks.append(
                    self._forward_logprobs(
                        input_ids[rows], attention_mask[rows], temperature, return_entropy, sampling, prefix_length
                    )
                )
        if return_entropy:
            return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return torch.cat(chunks)

    @contextmanager
    def _policy_context(self, policy: str) -> Iterator[None]:
        if policy == REFERENCE:
            with self._reference_policy():
                yield
        elif policy == "base":
            with self.adapters.disabled():
                yield
        else:
            with self.adapters.using(policy):
                yield

    def _forward_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        temperature: float,
        return_entropy: bool,
        sampling: SamplingSettings | None = None,
        prefix_length: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # Columns that are padding in every row (the batch's shared left/right padding) are skipped; the
        # result is zero there, like any other padded position.
        first, last = attended_columns(attention_mask)
        hidden = self.policy_forward(
            input_ids[:, first:last], attention_mask[:, first:last], prefix_length=window_prefix(prefix_length, first)
        )
        weight, bias = self._output_head()
        padding = (first, input_ids.shape[1] - last)
        if sampling is not None:
            result = processed_logprobs(
                hidden[:, :-1],
                weight,
                input_ids[:, first + 1 : last],
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                min_p=sampling.min_p,
                bias=bias,
                chunk_rows=self.fused_logprobs_chunk_rows,
            )
            # -inf (a token outside the trainer's kept set) stays -inf; padding is 0 like everywhere else
            return torch.nn.functional.pad(result, padding)
        if self.uses_liger_cross_entropy and not return_entropy and temperature == 1.0:
            result = liger_token_logprobs(hidden[:, :-1], weight, input_ids[:, first + 1 : last], bias)
            return torch.nn.functional.pad(result, padding)
        result = fused_logprobs(
            hidden[:, :-1],
            weight,
            input_ids[:, first + 1 : last],
            bias=bias,
            temperature=temperature,
            chunk_rows=self.fused_logprobs_chunk_rows,
            cast_logprobs_to_fp32=self.cast_logprobs_to_fp32,
            return_entropy=return_entropy,
        )
        if return_entropy:
            return tuple(torch.nn.functional.pad(r, padding) for r in result)
        return torch.nn.functional.pad(result, padding)

    @property
    def uses_liger_cross_entropy(self) -> bool:
        """Whether token log-probs go through Liger's fused linear cross-entropy (SFT and DPO with use_liger_loss;
        ``model/liger_triton.py``) instead of the fused log-prob op."""
        return False

    def _output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The lm_head's weight and bias; under ZeRO-3 a gathered, detached copy (the head is always frozen)."""
        weight, bias = self.policy_forward_module.output_head()
        if not self.dist.is_partitioned(weight):
            return weight, bias
        with self.dist.gathered([p for p in (weight, bias) if p is not None]):
            return weight.detach().clone(), None if bias is None else bias.detach().clone()

    @property
    def policy_forward_module(self) -> HiddenStatesModel:
        """The ``HiddenStatesModel`` with any accelerator wrapper removed."""
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(self.policy_forward, keep_torch_compile=False)
        return getattr(self.policy_forward, "_orig_mod", self.policy_forward)  # without torch.compile's wrapper

    @property
    def weights_version(self) -> int:
        """Changes whenever the trainable weights do (each optimizer step, each checkpoint load)."""
        return self._weights_version

    # ------------------------------------------------------------------------------------------ optimisation
    def make_policy_forward(self, actor: PeftModel) -> HiddenStatesModel:
        """The training forward over ``actor``: the module the accelerator wraps (PPO adds its value head)."""
        return HiddenStatesModel(
            actor,
            self.calc_position_embeddings,
            sequence_packing=self.packs_sequences,
            prefix_sharing=self.shares_prefixes,
        )

    def _check_prefix_sharing(self) -> bool:
        """Whether this model's cache lets a group's rows share their prompt's encoding (checked by running it)."""
        reason = prefix_sharing_unsupported_reason(decoder_of(self.actor))
        if reason is not None:
            logger.info("Each row encodes its own prompt: %s.", reason)
        return reason is None

    def _check_sequence_packing(self) -> bool:
        """Whether this model keeps packed sequences apart; if not, say once that packing is off and why."""
        reason = packing_unsupported_reason(decoder_of(self.actor))
        if reason is not None:
            warn_once("use_sequence_packing", f"use_sequence_packing=True has no effect: {reason}; batches stay padded")
        return reason is None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains: the trainable adapters and any extra trainable module (PPO's value head)."""
        return self.adapters.trainable_parameters() + self._extra_module_parameters()

    def _extra_module_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of the modules besides the adapters (``checkpoint_modules``: PPO's value head)."""
        return [p for spec in self.checkpoint_modules().values() for p in spec.module.parameters()]

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.trainable_parameters(), self.lr)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.cosine_lr_schedule_config)

    def _backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss``, this rank's share of the step's global loss (see distributed.py)."""
        self.dist.backward(loss, self.engine)

    def _optimizer_step(self) -> float:
        """The one optimizer step: gradients summed over ranks, clipped by their global norm, one optimizer step
        and one LR-schedule step, gradients zeroed. Returns the pre-clip gradient norm."""
        grad_norm = self.dist.optimizer_step(
            self.optimizer, self.trainable_parameters(), self.max_grad_norm, self.engine
        )
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self._weights_version += 1
        return grad_norm

    def get_policy(self) -> PeftModel:
        """The policy network: the PEFT model whose "actor" adapter is trained (the spec's ``get_policy``)."""
        return self.actor

    def preprocess_observation(self, observation: Any) -> Any:
        """Returned unchanged: an LLM's observations are prompts its environment has already tokenized."""
        return observation

    # ------------------------------------------------------------------------------------------ modes & wrapping
    def set_training_mode(self, training: bool) -> None:
        """Train mode enables LoRA dropout and gradient checkpointing; eval mode disables both.

        Only a change of mode walks the model's modules (thousands of them; on a small model that walk is a few
        percent of a step); every mode change in the package goes through here or restores what it found."""
        if self.actor.training != training:
            set_training(self.actor, training)

    def wrap_models(self) -> None:
        """Ready the training forward and optimizer for the accelerator's backend (together, for DeepSpeed).

        The LR schedule is never handed to Accelerate: a prepared schedule steps once per process per optimizer
        step. It stays ours and steps once per optimizer step (``_optimizer_step``).
        """
        if self.accelerator is None or self.engine is not None:
            return
        self.policy_forward, self.optimizer, self.engine = self.dist.prepare(
            self.policy_forward,
            self.optimizer,
            micro_batch_size=self.micro_batch_size_per_gpu,
            max_grad_norm=self.max_grad_norm,
            replicated=lora_parameters(self) + self._extra_module_parameters(),
        )

    def unwrap_models(self) -> None:
        """Remove the accelerator's wrapper from the training forward (not possible under DeepSpeed, whose engine
        owns the optimizer)."""
        if self.engine is not None:
            raise RuntimeError("a DeepSpeed engine cannot be unwrapped: it owns the optimizer state.")
        if self.accelerator is not None:
            self.policy_forward = self.accelerator.unwrap_model(self.policy_forward)

    def to_device(self, *experiences: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Move tensors to the agent's device."""
        return tuple(e.to(self.device) if isinstance(e, torch.Tensor) else e for e in experiences)

    def clean_up(self) -> None:
        """Release the networks and optimizer (and the accelerator's references to them, this agent's only: the
        other members of a population keep theirs)."""
        if self.accelerator is not None:
            self.dist.release(self.engine, self.__dict__.get("policy_forward"), self.__dict__.get("optimizer"))
        for name in ("policy_forward", "engine", "actor", "adapters", "optimizer", "lr_scheduler"):
            self.__dict__.pop(name, None)

    @classmethod
    def validate_hyperparameters(cls, values: dict[str, Any]) -> None:
        """Check hyperparameter values with the constructor's rules; raises ValueError / ValidationError naming
        the field. Names missing from ``values`` take the constructor's defaults (``pad_token_id``, which comes
        from the tokenizer, a valid placeholder). Used on checkpoint restore and by run configs."""
        defaults = inspect.signature(LLMAlgorithm.__init__).parameters

        def value(name: str) -> Any:
            return values[name] if name in values else defaults[name].default

        check_base_arguments(
            values.get("pad_token_id", 0),
            value("batch_size"),
            value("lr"),
            value("max_grad_norm"),
            value("micro_batch_size_per_gpu"),
            value("index"),
        )
        for model in cls.hyperparameter_models:
            model(**{name: values[name] for name in model.model_fields if name in values})
