"""The search-space models: parameters (float, int, categorical) and :class:`SearchSpace`.

A search space is data, never code::

    name: bonn-paper
    description: lam, theta, nu, lr and weight decay on log ranges around the paper's values
    parameters:
      lam:      {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
      binarize: {type: categorical, choices: [bonn, xnor]}
      theta:    {type: float, low: 1.0e-5, high: 1.0e-1, log: true, condition: {binarize: bonn}}
      width:    {type: int, low: 16, high: 64, step: 16}
    fixed: {model: wrn22, dataset: cifar10}
    warm_start:
      - {lam: 1.0e-4, theta: 1.0e-3, binarize: bonn}

Parameter kinds mirror Optuna's distributions (``optuna/distributions.py``):

- ``float``: ``low`` < ``high``, optional ``log`` (needs ``low > 0``) or ``step`` (must divide
  ``high - low``; not with ``log``) -> ``FloatDistribution``;
- ``int``: the same with integers (``log`` needs ``low >= 1``) -> ``IntDistribution``;
- ``categorical``: ``choices``, a non-empty list of distinct null / bool / number / string values
  -> ``CategoricalDistribution``.

Any parameter may carry ``condition: {other: value}`` (or ``{other: [v1, v2]}``, several keys = all
must hold): it is sampled only when the categorical parameter ``other`` was sampled with one of those
values, and is absent from the trial config otherwise (the trainer then uses its default).

Every entry point validates with the rules of :mod:`search_spaces.validation` and raises one
:class:`~search_spaces.errors.SearchSpaceError` listing every problem. Sampling
(:meth:`SearchSpace.define_by_run`, :meth:`SearchSpace.enqueue`) only calls methods of the trial or
study it is given, so this module does not import Optuna; :mod:`search_spaces.optuna` builds Optuna
distributions from these models.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from search_spaces.errors import ErrorList, SearchSpaceError
from search_spaces.validation import normalize_parameter, normalize_space
from search_spaces.values import choice_key
from search_spaces.yaml_io import dump_yaml

__all__ = ["Choice", "FloatParameter", "IntParameter", "CategoricalParameter", "Parameter", "SearchSpace"]

#: A categorical choice, a condition value or a warm-start value (what Optuna's
#: CategoricalDistribution accepts).
Choice = Union[None, StrictBool, StrictInt, StrictFloat, StrictStr]


class _ParameterBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        kind = cls.model_fields["type"].default
        if isinstance(data, _ParameterBase):
            data = data.model_dump()
        if isinstance(data, dict) and "type" not in data:
            data = {"type": kind, **data}
        errors = ErrorList()
        out = normalize_parameter(data, [], errors)
        if errors:
            raise SearchSpaceError(errors)
        if out["type"] != kind:
            raise SearchSpaceError([{"loc": ["type"], "msg": f"type must be {kind!r} (got {out['type']!r})"}])
        return out

    def suggest(self, trial: Any, name: str) -> Any:
        """``trial.suggest_*(name, ...)`` for this parameter (``trial``: an ``optuna.Trial``)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The compact form written to YAML (defaults left out)."""
        out = self.model_dump()
        condition = out.pop("condition", None)
        if condition is not None:
            out["condition"] = {k: v[0] if len(v) == 1 else v for k, v in condition.items()}
        if out.get("log") is False:
            out.pop("log")
        if out.get("step") is None or (out["type"] == "int" and out.get("step") == 1):
            out.pop("step", None)
        return out


class FloatParameter(_ParameterBase):
    """``trial.suggest_float(name, low, high, log=log, step=step)``."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = None
    condition: dict[str, list[Choice]] | None = None

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class IntParameter(_ParameterBase):
    """``trial.suggest_int(name, low, high, log=log, step=step)``."""

    type: Literal["int"] = "int"
    low: int
    high: int
    log: bool = False
    step: int = 1
    condition: dict[str, list[Choice]] | None = None

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


class CategoricalParameter(_ParameterBase):
    """``trial.suggest_categorical(name, choices)``."""

    type: Literal["categorical"] = "categorical"
    choices: list[Choice]
    condition: dict[str, list[Choice]] | None = None

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))


Parameter = Annotated[Union[FloatParameter, IntParameter, CategoricalParameter], Field(discriminator="type")]


def _plain_parameters(data: Any) -> Any:
    """``data`` with parameter models in ``parameters`` turned into dicts (validation reads data)."""
    if isinstance(data, dict) and isinstance(data.get("parameters"), dict):
        params = data["parameters"]
        if any(isinstance(p, _ParameterBase) for p in params.values()):
            plain = {k: p.model_dump() if isinstance(p, _ParameterBase) else p for k, p in params.items()}
            return {**data, "parameters": plain}
    return data


class SearchSpace(BaseModel):
    """A validated search space. Build it with :func:`search_spaces.load` (preset name, YAML path or
    dict), ``SearchSpace(**fields)`` or ``SearchSpace.model_validate(dict)``; all raise
    :class:`SearchSpaceError`. ``model_dump()`` / ``model_dump_json()`` round-trip exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    description: str = ""
    parameters: dict[str, Parameter]
    fixed: dict[str, Any] = Field(default_factory=dict)
    warm_start: list[dict[str, Choice]] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        if isinstance(data, SearchSpace):
            return data.model_dump()
        return normalize_space(_plain_parameters(data))

    # Every entry point raises SearchSpaceError rather than pydantic's ValidationError.
    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SearchSpaceError.from_validation_error(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> SearchSpace:  # type: ignore[override]
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise SearchSpaceError.from_validation_error(exc) from None

    @classmethod
    def model_validate_json(cls, json_data: Any, *args: Any, **kwargs: Any) -> SearchSpace:  # type: ignore[override]
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as exc:
            raise SearchSpaceError.from_validation_error(exc) from None

    # -- structure -----------------------------------------------------------------------------

    @property
    def warm_start_points(self) -> list[dict[str, Any]]:
        """Points evaluated first (Ray's ``OptunaSearch(points_to_evaluate=...)``); a copy."""
        return copy.deepcopy(self.warm_start)

    @property
    def names(self) -> list[str]:
        """Searched parameter names, in the order they are sampled (parents before children)."""
        order: list[str] = []
        placed: set[str] = set()
        pending = list(self.parameters)
        while pending:  # conditions are acyclic (validated), so this terminates
            for n in list(pending):
                cond = self.parameters[n].condition or {}
                if all(p in placed for p in cond):
                    order.append(n)
                    placed.add(n)
                    pending.remove(n)
        return order

    @property
    def conditional_names(self) -> list[str]:
        return [n for n in self.names if self.parameters[n].condition]

    def is_active(self, name: str, params: dict[str, Any]) -> bool:
        """Whether ``name`` is sampled given the values ``params`` sampled so far (its parents are
        sampled before it). A parameter whose parent is inactive is inactive too."""
        for parent, values in (self.parameters[name].condition or {}).items():
            if parent not in params or choice_key(params[parent]) not in {choice_key(v) for v in values}:
                return False
        return True

    def with_fixed(self, values: dict[str, Any], loc: tuple[str | int, ...] = ("fixed",)) -> SearchSpace:
        """A copy whose fixed values are updated with ``values`` (e.g. a StudySpec's ``base``); a key
        that is searched raises :class:`SearchSpaceError` with ``loc`` ``[*loc, key]``."""
        errors = [
            {"loc": [*loc, k], "msg": f"{k!r} is searched by space {self.name!r}; it cannot also be fixed"}
            for k in values
            if k in self.parameters
        ]
        if errors:
            raise SearchSpaceError(errors)
        data = self.model_dump()
        data["fixed"] = {**data["fixed"], **copy.deepcopy(dict(values))}
        try:
            return SearchSpace.model_validate(data)
        except SearchSpaceError as exc:
            raise SearchSpaceError(
                [
                    {"loc": [*loc, *e["loc"][1:]] if e["loc"][:1] == ["fixed"] else e["loc"], "msg": e["msg"]}
                    for e in exc.errors
                ]
            ) from None

    # -- sampling (duck-typed: an optuna.Trial / optuna.Study; search_spaces.optuna has the rest) --

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Sample every active parameter with ``trial.suggest_*`` (parents first; a parameter whose
        condition is false is not suggested) and return a copy of :attr:`fixed`. Pass the bound method
        as Ray Tune's ``OptunaSearch(space=space.define_by_run)``."""
        sampled: dict[str, Any] = {}
        for name in self.names:
            if self.is_active(name, sampled):
                sampled[name] = self.parameters[name].suggest(trial, name)
        return copy.deepcopy(self.fixed)

    def enqueue(self, study: Any, skip_if_exists: bool = True) -> int:
        """``study.enqueue_trial`` each warm-start point so that the study evaluates them first (plain
        Optuna use; Ray's ``OptunaSearch`` does the same with ``points_to_evaluate``). With
        ``skip_if_exists`` (default) a point already in the study (e.g. a resumed study) is not added
        again. Returns the number of points."""
        points = self.warm_start_points
        for point in points:
            study.enqueue_trial(point, skip_if_exists=skip_if_exists)
        return len(points)

    # -- grids ---------------------------------------------------------------------------------

    def grid(self) -> dict[str, list[Any]]:
        """``{name: values}`` for ``optuna.samplers.GridSampler``: categorical choices, every integer
        of an int range and every point of a float range with a ``step``. Raises
        :class:`SearchSpaceError` for continuous float parameters and conditional parameters."""
        errors: list[dict[str, Any]] = []
        out: dict[str, list[Any]] = {}
        for n, p in self.parameters.items():
            if p.condition:
                errors.append(
                    {
                        "loc": ["parameters", n, "condition"],
                        "msg": "grid search needs unconditional parameters (GridSampler tries every combination)",
                    }
                )
            elif isinstance(p, CategoricalParameter):
                out[n] = list(p.choices)
            elif isinstance(p, IntParameter):
                out[n] = list(range(p.low, p.high + 1, p.step))
            elif p.step is not None:
                k = int(round((p.high - p.low) / p.step))
                out[n] = [float(f"{p.low + i * p.step:.12g}") for i in range(k + 1)]
            else:
                errors.append(
                    {
                        "loc": ["parameters", n, "type"],
                        "msg": "grid search needs discrete parameters: a continuous float has no grid "
                        "(make it categorical or give it a step)",
                    }
                )
        if errors:
            raise SearchSpaceError(errors)
        return out

    def grid_size(self) -> int:
        """Number of points of :meth:`grid` (trials a full grid search runs)."""
        return math.prod(len(v) for v in self.grid().values())

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The compact, YAML-friendly form (parameter defaults left out); validates back to an equal
        space."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = {n: p.to_dict() for n, p in self.parameters.items()}
        if self.fixed:
            out["fixed"] = copy.deepcopy(self.fixed)
        if self.warm_start:
            out["warm_start"] = copy.deepcopy(self.warm_start)
        return out

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())
