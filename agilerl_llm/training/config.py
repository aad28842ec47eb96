"""Typed run configuration for the reasoning job (the quickstart, the CLI and ``configs/*.yaml``).

A run is: a base model (a HuggingFace folder, or a tiny model built in code), a built-in task, an
optional supervised warm start of the base, an RL algorithm with its constructor arguments, the
training loop settings and where metrics go. Everything is validated here, at the edge, so a typo in a
YAML file fails before any model is built, with the dotted field name in the message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agilerl_llm.checkpoint.run import CheckpointConfig
from agilerl_llm.envs.tasks import MULTITURN_ENVS, TASKS
from agilerl_llm.testing import ARCHITECTURES, MODEL_SIZES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """The base model: ``path`` to a ``save_pretrained`` folder, or a tiny model built from a preset."""

    path: str | None = None
    size: str = "tiny"
    architecture: str = "qwen2"
    seed: int = 0

    @field_validator("path")
    @classmethod
    def _existing_model_folder(cls, value: str | None) -> str | None:
        if value is not None and not (Path(value).expanduser() / "config.json").is_file():
            what = "is not a folder" if not Path(value).expanduser().is_dir() else "has no config.json"
            raise ValueError(
                f"{value!r} {what}: model.path must be a folder written by save_pretrained (models are not "
                "downloaded from a hub); leave it unset to build a tiny model"
            )
        return value

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        if value not in MODEL_SIZES:
            raise ValueError(f"unknown tiny model size {value!r}; choose one of {sorted(MODEL_SIZES)}")
        return value

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; choose one of {list(ARCHITECTURES)}")
        return value


class TaskSettings(_Section):
    """A built-in task (``agilerl_llm.envs.tasks.TASKS``) and the sizes of its disjoint splits."""

    name: str = "reverse"
    num_train: int = Field(2000, ge=1)
    num_test: int = Field(64, ge=1)
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; choose one of {sorted(TASKS)}")
        return value


class MultiTurnSettings(_Section):
    """A multi-turn run: the environment each episode is played in, and how many episodes a step plays.

    ``env`` is a built-in environment (``agilerl_llm.envs.tasks.MULTITURN_ENVS``) or ``"package.module:factory"``,
    a callable that returns a fresh ``MultiTurnEnv``; ``env_kwargs`` are passed to it. Held-out evaluation plays
    ``num_eval_episodes`` seeds from ``eval_seed`` on, greedily; training seeds count up from ``seed``.
    """

    env: str = "guess_number"
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    episodes_per_step: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    num_eval_episodes: int = Field(64, ge=1)
    eval_seed: int = Field(10_000, ge=0)

    @field_validator("env")
    @classmethod
    def _known_env(cls, value: str) -> str:
        if value not in MULTITURN_ENVS and ":" not in value:
            raise ValueError(
                f"unknown environment {value!r}; choose one of {sorted(MULTITURN_ENVS)} or give "
                "'package.module:factory' (a callable returning a MultiTurnEnv)"
            )
        return value


class WarmStartSettings(_Section):
    """Supervised pretraining of the base on the task's demonstrations before RL; ``steps: 0`` skips it."""

    steps: int = Field(80, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


# The quickstart's GRPO settings (configs/quickstart.yaml repeats them; a test keeps the two equal).
QUICKSTART_ALGORITHM_PARAMS: dict[str, Any] = {
    "group_size": 8,
    "lr": 1.5e-3,
    # Decaying the lr steadied the end of the run: at a constant 1e-3 the held-out reward swung by +-0.1
    # between evaluations after step 200; with this schedule it rose at every evaluation.
    "cosine_lr_schedule_config": {"num_epochs": 300, "warmup_proportion": 0.05, "min_lr_ratio": 0.1},
    "beta": 0.0,
    "max_output_tokens": 8,
    "temperature": 0.7,
    "top_k": 0,
    "top_p": 1.0,
    "batch_size": 128,
    "gradient_checkpointing": False,
}


# Constructor arguments a config cannot set: the job supplies them (the model, the tokenizer's pad token, devices).
_JOB_OWNED_ARGUMENTS = frozenset(
    {"self", "pad_token_id", "pad_token", "actor_network", "model_name", "accelerator", "clone", "wrap", "base_kwargs"}
)


class AlgorithmSettings(_Section):
    """The RL algorithm and the keyword arguments of its constructor (the spec's names and defaults).

    ``params`` is checked against the algorithm when the config is read (``agilerl-llm check`` and before
    ``train`` does any work): every name must be an argument of its constructor, and every value must pass the
    constructor's own rules."""

    name: Literal["GRPO", "GSPO", "CISPO"] = "GRPO"
    params: dict[str, Any] = Field(default_factory=lambda: dict(QUICKSTART_ALGORITHM_PARAMS))

    @model_validator(mode="after")
    def _check_params(self) -> AlgorithmSettings:
        check_algorithm_params(self.name, self.params)
        return self


def check_algorithm_params(name: str, params: dict[str, Any]) -> None:
    """Raise ValueError naming ``params.<field>`` when ``params`` would not construct algorithm ``name``."""
    import difflib
    import inspect

    import agilerl_llm

    cls = getattr(agilerl_llm, name)
    arguments = {
        parameter.name
        for klass in cls.__mro__
        if "__init__" in klass.__dict__
        for parameter in inspect.signature(klass.__init__).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    allowed = sorted(arguments - _JOB_OWNED_ARGUMENTS)
    for key in params:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"params.{key} is not an argument of {name}{hint}")
    try:
        cls.validate_hyperparameters(params)  # the constructor's rules, as on checkpoint restore
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"params.{field}: {first['msg']} (got {first.get('input')!r})") from None
    except ValueError as error:
        raise ValueError(f"params: {error}") from None


class TrainingSettings(_Section):
    """The loop: steps, prompts per step, evaluation cadence."""

    max_steps: int = Field(300, ge=1)
    data_batch_size_per_gpu: int = Field(16, ge=1)
    evaluation_interval: int = Field(50, ge=1)
    evaluate_at_start: bool = True
    # Tiny models gain nothing from intra-op threads, and OpenMP threads that spin-wait on shared cores
    # slowed a tiny-model step 100x on a busy 2-core machine; None keeps torch's default.
    num_threads: int | None = Field(1, ge=1)


class LoggingSettings(_Section):
    """Where metrics go besides stdout."""

    print_every: int = Field(25, ge=0)
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    progress: bool = True


class HyperparameterRange(_Section):
    """The range one hyperparameter may be mutated within, and the factors a mutation multiplies it by."""

    min: float
    max: float
    dtype: Literal["float", "int"] = "float"
    grow_factor: float = Field(1.2, gt=1)
    shrink_factor: float = Field(0.8, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> HyperparameterRange:
        if not self.min <= self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        if self.dtype == "int" and (self.min != int(self.min) or self.max != int(self.max)):
            raise ValueError(f"dtype int needs whole-number bounds, got min={self.min}, max={self.max}")
        return self


class EvolutionSettings(_Section):
    """A population on one shared base model that evolves every ``evo_steps`` steps: every member is evaluated
    on the held-out split, a tournament (with elitism) picks the parents, and their clones are mutated."""

    population_size: int = Field(4, ge=1)
    evo_steps: int = Field(25, ge=1)
    tournament_size: int = Field(2, ge=1)
    elitism: bool = True
    eval_loop: int = Field(1, ge=1)  # fitness = mean of the last eval_loop evaluations
    no_mutation: float = Field(0.4, ge=0)  # relative probabilities of leaving a child alone ...
    rl_hp: float = Field(0.6, ge=0)  # ... or perturbing one of its hyperparameters
    rand_seed: int = 0
    hyperparameters: dict[str, HyperparameterRange] = Field(
        default_factory=lambda: {"lr": HyperparameterRange(min=2e-4, max=5e-3)}
    )

    @model_validator(mode="after")
    def _check(self) -> EvolutionSettings:
        if self.tournament_size > self.population_size:
            raise ValueError(
                f"tournament_size ({self.tournament_size}) cannot exceed population_size ({self.population_size})"
            )
        if self.no_mutation + self.rl_hp <= 0:
            raise ValueError("no_mutation + rl_hp must be > 0 (they are relative probabilities)")
        return self


class RunConfig(_Section):
    """One reasoning run, end to end. ``output_dir`` receives the warm-started base and the final adapters."""

    output_dir: str = "runs/quickstart"
    model: ModelSettings = Field(default_factory=ModelSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)
    # A multi-turn run in an environment instead of the single-turn ``task`` (the two are exclusive).
    multiturn: MultiTurnSettings | None = None
    warm_start: WarmStartSettings = Field(default_factory=WarmStartSettings)
    algorithm: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    # Run checkpoints (step folders, latest pointer, retention, resume, HF exports); None saves nothing.
    checkpoint: CheckpointConfig | None = None
    # Evolutionary hyperparameter optimisation of a population; None trains one agent.
    evolution: EvolutionSettings | None = None

    @field_validator("output_dir")
    @classmethod
    def _usable_output_dir(cls, value: str) -> str:
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{value!r} exists and is not a folder; choose another output_dir")
        _check_can_create(path, "output_dir")
        return value

    @model_validator(mode="after")
    def _one_kind_of_run(self) -> RunConfig:
        # by value, not by fields set: overrides re-validate the resolved config, in which every section is set
        turns = self.multiturn
        if turns is None:
            return self
        if self.task != TaskSettings():
            raise ValueError("task and multiturn are exclusive: a run trains on a single-turn task OR in a multi-turn "
                             "environment; remove one of the two sections")  # fmt: skip
        last_training_seed = turns.seed + self.training.max_steps * turns.episodes_per_step
        if turns.eval_seed < last_training_seed and turns.seed < turns.eval_seed + turns.num_eval_episodes:
            raise ValueError(
                f"multiturn: the held-out seeds {turns.eval_seed}..{turns.eval_seed + turns.num_eval_episodes - 1} "
                f"overlap the training seeds {turns.seed}..{last_training_seed - 1}; move eval_seed past them"
            )
        return self

    @model_validator(mode="after")
    def _writable_checkpoint_path(self) -> RunConfig:
        if self.checkpoint is not None and isinstance(self.checkpoint.path, Path):
            path = self.checkpoint.path.expanduser()
            if path.exists() and not path.is_dir():
                raise ValueError(f"checkpoint.path: {str(path)!r} exists and is not a folder")
            _check_can_create(path, "checkpoint.path")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        """Read and validate a YAML run config; ``overrides`` are ``dotted.key=value`` strings (YAML values)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}.")
        return cls.from_dict(data, overrides, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> RunConfig:
        """Validate a nested dict, then apply ``overrides`` on top of the resolved values; errors name the field.

        Overrides land on the resolved config, so ``algorithm.params.lr=...`` changes one entry of the
        params dict and keeps the others (a ``params`` mapping written in a file replaces the default one).
        """
        try:
            config = cls.model_validate(data)
            if overrides:
                config = cls.model_validate(apply_overrides(config.model_dump(), overrides))
        except ValidationError as error:
            raise ConfigError(f"{source}: " + format_validation_error(error)) from error
        return config


def _check_can_create(path: Path, field: str) -> None:
    """``path`` exists and is writable, or its nearest existing parent is (so the run can create it)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{field}: {str(existing)!r} is not writable by this process; choose another folder")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the field and what to change."""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``"a.b.c=value"`` set; the value is parsed as YAML (``1e-3``, ``true``...)."""
    result = _deep_copy(data)
    for override in overrides:
        key, separator, raw_value = override.partition("=")
        if not separator or not key:
            raise ConfigError(
                f"override {override!r} is not of the form dotted.key=value (e.g. training.max_steps=10)."
            )
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # an optional section that is off (checkpoint: null) is switched on
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section.")
            node = child
        node[parts[-1]] = parse_scalar(raw_value)
    return result


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it, plus ``1e-3``-style floats (YAML 1.1 wants ``1.0e-3``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "value_error" and message.removeprefix("Value error, ").startswith("params"):
            lines.append(f"{location}.{message.removeprefix('Value error, ')}")  # names its own field and value
            continue
        if problem["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against the documented config"
        lines.append(f"{location}: {message} (got {problem.get('input')!r})")
    return "; ".join(lines)


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy(value) if isinstance(value, dict) else value for key, value in data.items()}
