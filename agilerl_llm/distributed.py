"""The one owner of multi-process training: who this process is, how processes talk, and what one step means.

``Distributed`` is built once per agent from its ``accelerate.Accelerator`` (or from None: one plain process)
and every other module asks it: rank and world size, the main process, barriers, reductions and gathers, the
backward pass and the optimizer step on each backend, the ZeRO-3 gather context and "is this parameter
partitioned". Nothing else inspects engines or DeepSpeed's parameter tags.

Backends (``Distributed.backend``):

* ``"single"``: one process, no accelerator (or an accelerator that sees one process);
* ``"data_parallel"``: several processes (Accelerate's MULTI_GPU / MULTI_CPU, i.e. a ``ddp`` config). Each
  process holds the whole model; after the last backward of an optimizer step the trainable gradients are
  summed across processes in one flat all-reduce. We do this ourselves instead of wrapping the model in
  torch's ``DistributedDataParallel``: only the LoRA adapters (and PPO's value head) train, so the reduction
  is small, and the algorithms run several backward passes per optimizer step through different adapters
  (PPO: actor, then critic), which DDP's bucketed hooks would reduce too early or flag as unused parameters;
* ``"deepspeed"``: a DeepSpeed engine (ZeRO-2 / ZeRO-3) owns the optimizer. It runs in DeepSpeed's unmanaged
  accumulation mode: ``backward`` only accumulates and ``step()`` is the optimizer step, so the number of
  backward passes per step is the algorithm's to choose.

What one optimizer step means, on every backend (docs/distributed.md says the same for users):

* every rank holds ``batch_size`` rows of its own; the global batch is ``batch_size x world_size`` rows;
* the rows are cut into micro-batches of ``micro_batch_size_per_gpu``; each micro-batch's loss is its share of
  the global loss (normalised by the action tokens, or pairs, of the whole global batch), and gradients
  accumulate over micro-batches;
* the gradient applied is the gradient of the global loss: summed over ranks (``backward`` scales the loss by
  the world size where DeepSpeed averages across ranks);
* gradients are clipped by their global norm, then exactly one optimizer step and one LR-schedule step run.

So N processes with B/N rows each take the same step as one process with B rows, up to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

SINGLE, DATA_PARALLEL, DEEPSPEED = "single", "data_parallel", "deepspeed"


def launched_world_size() -> int:
    """How many processes the launcher (torchrun / ``accelerate launch`` / mpirun) started, from its environment."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def shutdown_process_group() -> None:
    """End a multi-process run cleanly: wait for every rank, then destroy the default process group.

    Left to interpreter teardown, gloo's background threads can be destroyed while still joinable, and a rank then
    aborts after a finished run ("terminate called without an active exception", SIGABRT). Seen under load.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _deepspeed_requested(deepspeed_plugin: Any) -> bool:
    return deepspeed_plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(**kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` that sees every process the launcher started, on GPU and CPU machines.

    On a machine without CUDA, Accelerate treats a torchrun / ``accelerate launch`` process as a lone process
    unless told to use the CPU; here the CPU process group over gloo is set up instead (and DeepSpeed is pointed
    at its CPU accelerator). ``kwargs`` go to ``Accelerator`` (e.g. ``deepspeed_plugin``, ``mixed_precision``).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if launched_world_size() > 1 and not torch.cuda.is_available():
        handlers = list(kwargs.pop("kwargs_handlers", None) or [])
        if not any(isinstance(handler, InitProcessGroupKwargs) for handler in handlers):
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        kwargs["kwargs_handlers"] = handlers
        if _deepspeed_requested(kwargs.get("deepspeed_plugin")):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        else:
            kwargs.setdefault("cpu", True)
    accelerator = Accelerator(**kwargs)
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Any | None) -> None:
    """Refuse to train alone when the launcher started several processes but this one cannot see them."""
    launched = launched_world_size()
    seen = 1 if accelerator is None else int(accelerator.num_processes)
    if launched > 1 and seen != launched:
        what = "no accelerator was given" if accelerator is None else f"the accelerator sees {seen} process(es)"
        raise RuntimeError(
            f"This process is one of {launched} started by the launcher (WORLD_SIZE={launched}), but {what}: every "
            "process would train alone on the same data. Build the accelerator with agilerl_llm.make_accelerator() "
            "(it sets up the gloo process group on machines without GPUs, where a plain Accelerator() sees one "
            "process) and pass accelerator=... to the agent."
        )


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 holds only a shard of ``parameter`` here (ZeRO-3 tags its parameters ``ds_id``)."""
    return hasattr(parameter, "ds_id")


@contextmanager
def gathered(parameters: Iterable[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Full parameters inside the block under ZeRO-3 (re-partitioned on exit, with rank 0's edits when ``modify``);
    a no-op for parameters that are not partitioned. Every rank must enter it (it is a collective)."""
    parameters = [parameter for parameter in parameters if is_partitioned(parameter)]
    if not parameters:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None):
        yield


class Distributed:
    """Rank, world size and collectives of one agent's accelerator, and its backward / optimizer step.

    Args:
        accelerator: an ``accelerate.Accelerator``, or None for one plain process.
    """

    def __init__(self, accelerator: Any | None = None) -> None:
        check_launch(accelerator)
        self.accelerator = accelerator
        self.world_size = 1 if accelerator is None else int(accelerator.num_processes)
        self.rank = 0 if accelerator is None else int(accelerator.process_index)
        plugin = None if accelerator is None else getattr(accelerator.state, "deepspeed_plugin", None)
        self.deepspeed_plugin = plugin
        self.zero_stage = None if plugin is None else int(plugin.zero_stage)
        if plugin is not None:
            self.backend = DEEPSPEED
        else:
            self.backend = DATA_PARALLEL if self.world_size > 1 else SINGLE
        self.device = torch.device(accelerator.device) if accelerator is not None else None

    # ------------------------------------------------------------------------------------------ who am I
    @property
    def is_main(self) -> bool:
        """The process that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def synced_generation(self) -> bool:
        """Whether generation must keep every rank stepping together (ZeRO-3 gathers each layer collectively)."""
        return self.zero_stage == 3 and self.world_size > 1

    def describe(self) -> str:
        stage = f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else ""
        return f"{self.backend}{stage}, rank {self.rank} of {self.world_size}"

    # ------------------------------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.accelerator is not None and self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over ranks (a new tensor; ``tensor`` itself is untouched)."""
        if self.world_size == 1:
            return tensor.clone()
        import torch.distributed as torch_dist

        result = tensor.detach().to(self._comm_device(), copy=True)
        torch_dist.all_reduce(result, op=torch_dist.ReduceOp.SUM)
        return result.to(tensor.device)

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if self.world_size == 1:
            return int(value)
        import torch.distributed as torch_dist

        result = torch.tensor([int(value)], dtype=torch.int64, device=self._comm_device())
        torch_dist.all_reduce(result, op=torch_dist.ReduceOp.MAX)
        return int(result.item())

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over ranks, in one collective (every rank must pass the same keys)."""
        return self._reduce_floats(values, mean=False)

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over ranks, in one collective (every rank must pass the same keys)."""
        return self._reduce_floats(values, mean=True)

    def _reduce_floats(self, values: dict[str, float], mean: bool) -> dict[str, float]:
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        names = self.gather_objects(keys)
        if any(other != keys for other in names):
            raise RuntimeError(f"ranks report different metrics and cannot be reduced: {names}")
        totals = self.all_reduce_sum(torch.tensor([float(values[key]) for key in keys], dtype=torch.float64))
        if mean:
            totals = totals / self.world_size
        return {key: float(total) for key, total in zip(keys, totals.tolist(), strict=True)}

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` from every rank, concatenated along dim 0 in rank order (same shape on every rank)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as torch_dist

        local = tensor.detach().to(self._comm_device()).contiguous()
        pieces = [torch.empty_like(local) for _ in range(self.world_size)]
        torch_dist.all_gather(pieces, local)
        return torch.cat(pieces).to(tensor.device)

    def gather_objects(self, value: Any) -> list[Any]:
        """``value`` (picklable, produced by our own code on each rank) from every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as torch_dist

        gathered_values: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered_values, value)
        return gathered_values

    def broadcast_parameters(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``parameters`` to every rank (so all ranks start identical)."""
        if self.world_size == 1 or not parameters:
            return
        import torch.distributed as torch_dist

        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(self._comm_device(), torch.float64) for p in parameters])
            torch_dist.broadcast(flat, src=0)
            offset = 0
            for parameter in parameters:
                count = parameter.numel()
                parameter.copy_(flat[offset : offset + count].view_as(parameter).to(parameter.dtype))
                offset += count

    # ------------------------------------------------------------------------------------------ parameters
    is_partitioned = staticmethod(is_partitioned)
    gathered = staticmethod(gathered)

    # ------------------------------------------------------------------------------------------ training
    def prepare(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batch_size: int,
        max_grad_norm: float | None,
        replicated: Sequence[torch.nn.Parameter] = (),
    ) -> tuple[torch.nn.Module, Any, Any | None]:
        """Ready ``module`` and ``optimizer`` for this backend; returns (module, optimizer, DeepSpeed engine or None).

        DeepSpeed: Accelerate builds the engine from its config with our sizes filled in where it says "auto"
        (the engine broadcasts rank 0's parameters itself); the LR schedule stays ours (stepped once per optimizer
        step), never the engine's.
        Data parallel: rank 0's values of ``replicated`` (every adapter, the frozen reference included, and the
        extra trainable modules) are broadcast, so every rank starts from the same weights even if the ranks were
        seeded differently.
        """
        if self.backend != DEEPSPEED:
            self.broadcast_parameters(list(replicated))
            return module, optimizer, None
        self._fill_deepspeed_config(micro_batch_size, max_grad_norm)
        engine, optimizer = self.accelerator.prepare(module, optimizer)
        if not hasattr(engine, "managed_gradient_accumulation"):
            raise RuntimeError(
                "this DeepSpeed has no unmanaged gradient accumulation (managed_gradient_accumulation=false); "
                "install deepspeed>=0.19.8 (pip install 'agilerl-llm[deepspeed]')."
            )
        return engine, optimizer, engine

    def _fill_deepspeed_config(self, micro_batch_size: int, max_grad_norm: float | None) -> None:
        """Resolve the DeepSpeed config's "auto" values from ours (no dataloader tells Accelerate the micro-batch),
        and put the engine in unmanaged accumulation: one ``engine.step()`` per optimizer step."""
        plugin = self.deepspeed_plugin
        config = plugin.deepspeed_config
        ours = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,  # accumulation is ours: backward accumulates, step() applies
            "gradient_clipping": max_grad_norm or 0.0,
            "train_batch_size": None,  # micro-batch x world size, worked out below
        }
        # The plugin's config is shared by every engine of the process (a population has one per member), so the
        # keys the user left on "auto" are remembered and refilled from each agent; the others are the user's.
        auto = getattr(plugin, "_agilerl_llm_auto_keys", None)
        if auto is None:
            auto = frozenset(key for key in ours if config.get(key, "auto") == "auto")
            plugin._agilerl_llm_auto_keys = auto
        for key in auto:
            config[key] = ours[key]
        if "train_batch_size" in auto:
            config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * self.world_size
        clipping = config["gradient_clipping"]
        if float(clipping or 0.0) != float(max_grad_norm or 0.0):
            raise ValueError(
                f"the DeepSpeed config sets gradient_clipping={clipping} but the agent's max_grad_norm is "
                f"{max_grad_norm}; set gradient_clipping to 'auto' (the agent's value is used) or make them agree."
            )
        if config["gradient_accumulation_steps"] != 1:
            raise ValueError(
                f"the DeepSpeed config sets gradient_accumulation_steps={config['gradient_accumulation_steps']}; "
                "set it to 1 or 'auto': accumulation follows the agent's batch_size // micro_batch_size_per_gpu."
            )
        if config.get("managed_gradient_accumulation", False):
            raise ValueError(
                "the DeepSpeed config sets managed_gradient_accumulation=true; remove it: the agent decides when an "
                "optimizer step happens (one engine.step() per step)."
            )
        config["managed_gradient_accumulation"] = False

    def backward(self, loss: torch.Tensor, engine: Any | None) -> None:
        """Accumulate the gradient of ``loss`` (this rank's share of the global loss); no optimizer step."""
        if engine is not None:
            # DeepSpeed averages gradients over ranks; scaling by the world size makes it the sum.
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
        else:
            loss.backward()

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Sequence[torch.nn.Parameter],
        max_grad_norm: float | None,
        engine: Any | None,
    ) -> float:
        """Sum gradients over ranks, clip by the global norm, step once, zero the gradients; the pre-clip norm."""
        if engine is not None:
            engine.step()  # reduces, clips (gradient_clipping) and steps exactly once, then zeroes gradients
            norm = engine.get_global_grad_norm()
            return float("nan") if norm is None else float(norm)
        if self.world_size > 1:
            self._all_reduce_gradients(parameters)
        max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _all_reduce_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """One flat all-reduce (sum) of every trainable gradient. A parameter that no backward reached on some rank
        counts as zero there (every rank reduces the same layout); one reached on no rank keeps no gradient, so the
        optimizer skips it exactly as a single process would."""
        import torch.distributed as torch_dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        present = torch.tensor([float(p.grad is not None) for p in parameters], dtype=grads[0].dtype)
        flat = torch.cat([g.reshape(-1) for g in grads] + [present.to(grads[0].device)]).to(self._comm_device())
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        reached = flat[-len(parameters) :] > 0
        offset = 0
        for index, (parameter, grad) in enumerate(zip(parameters, grads, strict=True)):
            count = grad.numel()
            summed = flat[offset : offset + count].view_as(grad).to(grad.device, grad.dtype).clone()
            parameter.grad = summed if bool(reached[index]) else None
            offset += count

    def release(self, *objects: Any) -> None:
        """Forget one agent's prepared objects (its engine, module, optimizer) and free its DeepSpeed engine.

        ``Accelerator.free_memory`` would release every prepared object and destroy the most recently built engine,
        which in a population belongs to another member; this releases only the ones given.
        """
        if self.accelerator is None:
            return
        doomed = {id(obj) for obj in objects if obj is not None}
        for name in ("_models", "_optimizers", "_schedulers"):
            kept = [obj for obj in getattr(self.accelerator, name, []) if id(obj) not in doomed]
            setattr(self.accelerator, name, kept)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None and id(wrapped.engine) in doomed:
            self.accelerator.deepspeed_engine_wrapped = None
        unique = {id(obj): obj for obj in objects if obj is not None}
        for obj in unique.values():
            if self.backend == DEEPSPEED and hasattr(obj, "destroy"):
                obj.destroy()  # the engine's own buffers and hooks

    @staticmethod
    def refresh_master_weights(engine: Any | None) -> None:
        """After writing parameters directly, copy them into ZeRO's fp32 master partitions too."""
        optimizer = getattr(engine, "optimizer", None)
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()
