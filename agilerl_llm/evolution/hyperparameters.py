"""Mutation ranges of the RL hyperparameters: ``RLParameter`` and ``HyperparameterConfig``.

A ``HyperparameterConfig`` names the agent attributes evolution may change (``lr``, ``beta``, ``clip_coef``,
``temperature``, ``group_size``, ``update_epochs``, or any other int/float attribute of the algorithm) and,
for each, the range ``[min, max]`` and the factors a mutation multiplies it by. Every range is checked when
the config is built, and every name again when an agent is built with the config (``check_agent``), so a
typo fails before any training starts rather than at the first mutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_DTYPES = {"float": float, "int": int, float: float, int: int}


@dataclass(frozen=True)
class RLParameter:
    """The mutation range of one hyperparameter.

    A mutation multiplies the current value by ``grow_factor`` or ``shrink_factor`` (chosen at random), clips
    the result to ``[min, max]`` and, for ``dtype=int``, rounds it; an int that rounding would leave unchanged
    moves by one step in the chosen direction instead, so small integers (``update_epochs=1``) can move.

    The fields are checked by the ``HyperparameterConfig`` that holds the parameter, so the error can name it.

    Args:
        min: the smallest value a mutation may set.
        max: the largest value a mutation may set.
        dtype: ``float`` or ``int`` (or their names, for configs read from YAML/JSON).
        grow_factor: multiplier of a growing mutation, > 1.
        shrink_factor: multiplier of a shrinking mutation, in (0, 1).
    """

    min: float
    max: float
    dtype: type | str = float
    grow_factor: float = 1.2
    shrink_factor: float = 0.8

    def problems(self) -> list[str]:
        """What is wrong with this range (empty when it is valid)."""
        found = []
        dtype = _DTYPES.get(self.dtype) if isinstance(self.dtype, (str, type)) else None
        if dtype is None:
            return [f"dtype must be float or int, got {self.dtype!r}"]
        for field in ("min", "max", "grow_factor", "shrink_factor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                found.append(f"{field} must be a finite number, got {value!r}")
        if found:
            return found
        if self.min > self.max:
            found.append(f"min={self.min!r} is greater than max={self.max!r}")
        if dtype is int and (self.min != int(self.min) or self.max != int(self.max)):
            found.append(f"dtype=int needs integer bounds, got min={self.min!r}, max={self.max!r}")
        if not self.grow_factor > 1.0:
            found.append(f"grow_factor must be > 1, got {self.grow_factor!r}")
        if not 0.0 < self.shrink_factor < 1.0:
            found.append(f"shrink_factor must be in (0, 1), got {self.shrink_factor!r}")
        return found

    @property
    def type(self) -> type:
        """The value type, ``float`` or ``int``."""
        return _DTYPES[self.dtype]

    def contains(self, value: float) -> bool:
        """True when ``value`` lies in ``[min, max]``."""
        return self.min <= value <= self.max

    def mutate(self, value: float, grow: bool) -> float | int:
        """The value after one growing (``grow=True``) or shrinking mutation, clipped to the range."""
        factor = self.grow_factor if grow else self.shrink_factor
        new = value * factor
        if self.type is int:
            new = round(new)
            if new == value:
                new = value + (1 if grow else -1)
            return int(min(max(new, self.min), self.max))
        return float(min(max(new, self.min), self.max))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able); ``RLParameter(**d)`` rebuilds it."""
        return {
            "min": self.min,
            "max": self.max,
            "dtype": self.type.__name__,
            "grow_factor": self.grow_factor,
            "shrink_factor": self.shrink_factor,
        }


class HyperparameterConfig(Mapping[str, RLParameter]):
    """The hyperparameters evolution may mutate, by attribute name.

    ``HyperparameterConfig(lr=RLParameter(min=1e-5, max=1e-2), group_size=RLParameter(2, 16, dtype=int))``.
    A value may also be a dict of ``RLParameter`` fields. An empty config is allowed and means "nothing to
    mutate": a ``Mutations`` that then picks a hyperparameter mutation raises instead of silently skipping it.

    Raises:
        ValueError: naming the field, for a range that is not valid (see ``RLParameter``).
    """

    def __init__(self, **parameters: RLParameter | Mapping[str, Any]) -> None:
        self._parameters: dict[str, RLParameter] = {}
        for name, parameter in parameters.items():
            if isinstance(parameter, Mapping):
                try:
                    parameter = RLParameter(**parameter)
                except TypeError as error:
                    raise ValueError(f"hp_config field {name!r}: {error}") from error
            if not isinstance(parameter, RLParameter):
                raise ValueError(
                    f"hp_config field {name!r} must be an RLParameter (or a dict of its fields), "
                    f"got {type(parameter).__name__}."
                )
            if problems := parameter.problems():
                raise ValueError(f"hp_config field {name!r}: " + "; ".join(problems) + ".")
            self._parameters[name] = parameter

    def __getitem__(self, name: str) -> RLParameter:
        return self._parameters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={parameter!r}" for name, parameter in self._parameters.items())
        return f"HyperparameterConfig({inner})"

    def names(self) -> list[str]:
        """The mutable hyperparameter names, in the order given."""
        return list(self._parameters)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (JSON-able); ``HyperparameterConfig(**d)`` rebuilds it."""
        return {name: parameter.to_dict() for name, parameter in self._parameters.items()}

    def check_agent(self, agent: Any) -> None:
        """Raise ``ValueError`` unless every name is a scalar attribute of ``agent`` whose value is in range.

        Learning-rate names (``agent.get_lr_names()``) also need ``min > 0``.
        """
        algorithm = type(agent).__name__
        lr_names = set(agent.get_lr_names()) if hasattr(agent, "get_lr_names") else {"lr"}
        for name, parameter in self._parameters.items():
            if name.startswith("_") or not hasattr(agent, name):
                raise ValueError(f"hp_config names {name!r}, which is not a hyperparameter of {algorithm}.")
            value = getattr(agent, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"hp_config names {name!r}, but {algorithm}.{name} is {value!r} ({type(value).__name__}); "
                    "only int and float hyperparameters can be mutated."
                )
            if parameter.type is int and not isinstance(value, int):
                raise ValueError(f"hp_config field {name!r} has dtype=int but {algorithm}.{name}={value!r} is a float.")
            if not parameter.contains(value):
                raise ValueError(
                    f"{algorithm}.{name}={value!r} lies outside its hp_config range "
                    f"[{parameter.min!r}, {parameter.max!r}]; widen the range or change {name}."
                )
            if name in lr_names and parameter.min <= 0:
                raise ValueError(
                    f"hp_config field {name!r} is a learning rate: min must be > 0, got {parameter.min!r}."
                )


def as_hyperparameter_config(hp_config: HyperparameterConfig | Mapping[str, Any] | None) -> HyperparameterConfig | None:
    """Accept a ``HyperparameterConfig``, a plain mapping of its fields (from YAML/JSON), or None."""
    if hp_config is None or isinstance(hp_config, HyperparameterConfig):
        return hp_config
    if isinstance(hp_config, Mapping):
        return HyperparameterConfig(**hp_config)
    raise ValueError(f"hp_config must be a HyperparameterConfig, a dict or None, got {type(hp_config).__name__}.")
