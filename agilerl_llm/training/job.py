"""The reasoning job: base model -> optional warm start -> RL with LoRA -> held-out reward before and after.

``run_reasoning_job(config)`` is what the quickstart and ``agilerl-llm train`` run (``run_job`` hands a config with a
``multiturn`` section to ``training/multiturn_job.py`` instead). Every model crosses
the disk through ``save_pretrained`` / ``from_pretrained``, as a user's own checkpoint would: the tiny
base (built in code, or warm-started) is written to ``<output_dir>/base`` and the RL agent loads it from
there.

Under ``accelerate launch`` (several processes) the job builds the accelerator itself
(``agilerl_llm.make_accelerator``: DDP-style data parallel, or DeepSpeed when the launch config says so): the
main process prepares the base model and writes the files, the others wait and load it, and every process trains
its share of each batch (docs/distributed.md).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.algorithms.grpo import CISPO, GRPO, GSPO
from agilerl_llm.checkpoint.run import CheckpointManager
from agilerl_llm.distributed import Distributed, launched_world_size, make_accelerator
from agilerl_llm.envs.reasoning import ReasoningGym
from agilerl_llm.envs.tasks import get_task
from agilerl_llm.evolution import HyperparameterConfig, Mutations, RLParameter, TournamentSelection
from agilerl_llm.optim import CosineLRScheduleConfig
from agilerl_llm.testing import build_tiny_model, build_tiny_tokenizer
from agilerl_llm.training.config import ConfigError, EvolutionSettings, RunConfig, format_validation_error
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.loop import fittest_first
from agilerl_llm.training.reasoning import finetune_llm_reasoning, mean_eval_reward
from agilerl_llm.training.warmstart import pretrain_on_demonstrations, save_base_model
from agilerl_llm.utils.seeding import seed_everything

ALGORITHMS = {"GRPO": GRPO, "GSPO": GSPO, "CISPO": CISPO}


@dataclass
class JobResult:
    """What a run produced: held-out reward before and after RL, the metrics history and where files went."""

    reward_before: float
    reward_after: float
    exact_before: float
    exact_after: float
    history: list[dict[str, float]]
    base_model_dir: Path
    seconds: float
    # The final population (one agent without evolution), fittest first by its last held-out evaluation.
    population: list[LLMAlgorithm] = field(default_factory=list)
    # False on every process but the main one of a multi-process launch (which alone reports).
    is_main: bool = True
    # What exact_before / exact_after measure (a multi-turn run reports its success rate there).
    exact_label: str = "held-out exact answers"


def prepare_base_model(
    config: RunConfig, demonstrations: Callable[[PreTrainedTokenizerBase], list[tuple[str, str]]] | None
) -> Path:
    """The folder the RL agent loads: ``model.path`` as is, or a tiny model (warm-started if configured).

    ``demonstrations(tokenizer)`` gives the warm start's ``(prompt, completion)`` pairs, rendered with that
    tokenizer; None when the task or environment has none (then ``warm_start.steps`` must be 0).
    """
    if config.model.path is not None and config.warm_start.steps == 0:
        return Path(config.model.path)
    if config.model.path is not None:
        tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        model = AutoModelForCausalLM.from_pretrained(config.model.path)
    else:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(
            config.model.size, architecture=config.model.architecture, tokenizer=tokenizer, seed=config.model.seed
        )
    if config.warm_start.steps > 0:
        if demonstrations is None:
            raise ConfigError("warm_start.steps > 0 but this run has no demonstrations to learn from; set it to 0.")
        pretrain_on_demonstrations(
            model,
            tokenizer,
            demonstrations(tokenizer),
            steps=config.warm_start.steps,
            batch_size=config.warm_start.batch_size,
            lr=config.warm_start.lr,
            seed=config.warm_start.seed,
        )
    return save_base_model(model, tokenizer, Path(config.output_dir) / "base")


def write_resolved_config(config: RunConfig) -> Path:
    """Write the run's config, defaults filled in, to ``<output_dir>/config.yaml`` (what produced this run)."""
    path = Path(config.output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def render_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system_prompt: str | None) -> str:
    """The prompt text exactly as ``ReasoningGym`` renders it (chat template + generation prompt)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_population(
    config: RunConfig, base_dir: Path, tokenizer: PreTrainedTokenizerBase, accelerator: Any | None = None
) -> list[GRPO]:
    """The configured algorithm on a freshly loaded base: one agent, or with ``evolution`` a population whose
    members share that one base (each with its own adapters and optimizer). Unknown parameters name the field."""
    cls = ALGORITHMS[config.algorithm.name]
    # GRPO forwards its **base_kwargs to LLMAlgorithm, so both signatures hold accepted names.
    accepted = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(LLMAlgorithm.__init__).parameters
    )
    for key in config.algorithm.params:
        if key not in accepted or key in {"self", "pad_token_id", "pad_token", "actor_network", "model_name"}:
            raise ConfigError(
                f"algorithm.params.{key} is not a settable argument of {cls.__name__}; "
                "see the algorithm's docstring for the accepted names."
            )
    params = {"seed": config.model.seed, "accelerator": accelerator} | config.algorithm.params
    if isinstance(params.get("cosine_lr_schedule_config"), dict):
        try:
            params["cosine_lr_schedule_config"] = CosineLRScheduleConfig(**params["cosine_lr_schedule_config"])
        except ValidationError as error:
            raise ConfigError(
                "algorithm.params.cosine_lr_schedule_config: " + format_validation_error(error)
            ) from error
    network = AutoModelForCausalLM.from_pretrained(base_dir)
    if config.evolution is None:
        return [cls(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=network, **params)]
    try:
        return cls.population(
            config.evolution.population_size,
            pad_token_id=tokenizer.pad_token_id,
            pad_token=tokenizer.pad_token,
            actor_network=network,
            hp_config=hyperparameter_config(config.evolution),
            **params,
        )
    except ValueError as error:  # e.g. a mutable hyperparameter the algorithm does not have, or out of range
        raise ConfigError(f"evolution.hyperparameters: {error}") from error


def hyperparameter_config(settings: EvolutionSettings) -> HyperparameterConfig:
    """The ``HyperparameterConfig`` of the ``evolution.hyperparameters`` section."""
    return HyperparameterConfig(
        **{
            name: RLParameter(
                min=int(r.min) if r.dtype == "int" else r.min,
                max=int(r.max) if r.dtype == "int" else r.max,
                dtype=int if r.dtype == "int" else float,
                grow_factor=r.grow_factor,
                shrink_factor=r.shrink_factor,
            )
            for name, r in settings.hyperparameters.items()
        }
    )


def evolution_arguments(settings: EvolutionSettings | None) -> dict[str, Any]:
    """``evo_steps`` / ``tournament`` / ``mutation`` for the finetune loop (nothing without evolution)."""
    if settings is None:
        return {}
    return {
        "evo_steps": settings.evo_steps,
        "tournament": TournamentSelection(
            tournament_size=settings.tournament_size,
            elitism=settings.elitism,
            population_size=settings.population_size,
            eval_loop=settings.eval_loop,
            rand_seed=settings.rand_seed,
        ),
        "mutation": Mutations(no_mutation=settings.no_mutation, rl_hp=settings.rl_hp, rand_seed=settings.rand_seed + 1),
    }


def make_logger(config: RunConfig, is_main: bool = True) -> MetricsLogger:
    """The configured metrics sinks; a resumed run continues the W&B run its checkpoint recorded. Processes other
    than the main one get a silent logger (no TensorBoard files, no W&B run)."""
    if not is_main:
        return MetricsLogger(print_every=0)
    wandb_kwargs = None
    if config.logging.wandb_project is not None:
        wandb_kwargs = {"project": config.logging.wandb_project}
        resume = (
            CheckpointManager(config.checkpoint, writer=False).resume_info() if config.checkpoint is not None else None
        )
        if resume is not None and resume.wandb_run_id is not None:
            wandb_kwargs |= {"id": resume.wandb_run_id, "resume": "allow"}
    return MetricsLogger(
        tensorboard_dir=config.logging.tensorboard_dir,
        wandb_kwargs=wandb_kwargs,
        print_every=config.logging.print_every,
    )


def start_processes(config: RunConfig) -> tuple[Any | None, Distributed]:
    """Thread count, the accelerator of a multi-process launch (None in one process) and the seeded generators."""
    if config.training.num_threads is not None:
        torch.set_num_threads(config.training.num_threads)
    accelerator = make_accelerator() if launched_world_size() > 1 else None
    seed_everything(config.model.seed)
    return accelerator, Distributed(accelerator)


def shared_base_model(
    config: RunConfig,
    dist: Distributed,
    demonstrations: Callable[[PreTrainedTokenizerBase], list[tuple[str, str]]] | None,
) -> tuple[Path, PreTrainedTokenizerBase]:
    """The base model folder and its tokenizer on every process: the main one writes the resolved config and
    prepares the base (``prepare_base_model``), the others wait and load what it wrote."""
    if dist.is_main:
        write_resolved_config(config)
        base_dir = prepare_base_model(config, demonstrations)
    dist.barrier()
    base_dir = Path(dist.gather_objects(str(base_dir) if dist.is_main else None)[0])
    seed_everything(config.model.seed)  # every rank continues from the same generator states
    return base_dir, AutoTokenizer.from_pretrained(base_dir)


def run_job(config: RunConfig) -> JobResult:
    """The job ``config`` describes: a multi-turn run when it has a ``multiturn`` section, else the reasoning job."""
    if config.multiturn is not None:
        from agilerl_llm.training.multiturn_job import run_multiturn_job  # it imports this module

        return run_multiturn_job(config)
    return run_reasoning_job(config)


def run_reasoning_job(config: RunConfig) -> JobResult:
    """Run ``config`` end to end and report the held-out reward before and after RL."""
    started = time.perf_counter()
    accelerator, dist = start_processes(config)
    task = get_task(config.task.name)
    train, test = task.make_dataset(config.task.num_train, config.task.num_test, config.task.seed)
    base_dir, tokenizer = shared_base_model(
        config,
        dist,
        lambda tokenizer: [
            (render_prompt(tokenizer, s["question"], task.system_prompt), s["answer"] + tokenizer.eos_token)
            for s in train
        ],
    )
    env = ReasoningGym(
        train,
        test,
        tokenizer,
        task.reward_fn,
        data_batch_size_per_gpu=config.training.data_batch_size_per_gpu,
        system_prompt=task.system_prompt,
        seed=config.task.seed,
        accelerator=accelerator,
    )
    pop = build_population(config, base_dir, tokenizer, accelerator)
    exact_before = _exact_match_rate(pop[0], env)
    logger = make_logger(config, dist.is_main)
    pop, history = finetune_llm_reasoning(
        pop,
        env,
        max_steps=config.training.max_steps,
        evaluation_interval=config.training.evaluation_interval,
        evaluate_at_start=config.training.evaluate_at_start,
        logger=logger,
        progress=config.logging.progress,
        checkpoint=config.checkpoint,
        **evolution_arguments(config.evolution),
    )
    pop = fittest_first(pop)
    final_step = config.training.max_steps
    final_rows = [row for row in history if row["step"] == final_step and row["agent"] == pop[0].index]
    return JobResult(
        reward_before=mean_eval_reward(history, 0),
        reward_after=final_rows[-1]["eval/reward"] if final_rows else mean_eval_reward(history, final_step),
        exact_before=exact_before,
        exact_after=_exact_match_rate(pop[0], env),
        history=history,
        base_model_dir=base_dir,
        seconds=time.perf_counter() - started,
        population=pop,
        is_main=dist.is_main,
    )


def _exact_match_rate(agent: GRPO, env: ReasoningGym) -> float:
    """Share of held-out prompts whose greedy completion earns the full reward of 1.0."""
    rewards = agent.test(env)
    agent.fitness.pop()  # a diagnostic, not an evaluation the population should rank on
    return float((rewards >= 1.0).float().mean())
