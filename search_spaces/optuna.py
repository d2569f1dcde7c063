"""Search space -> Optuna: distributions, the define-by-run function, warm-start enqueueing.

All imports are absolute, so this module's name never shadows the ``optuna`` package.

- :func:`to_optuna_distributions`: ``{name: FloatDistribution | IntDistribution |
  CategoricalDistribution}`` (for ``study.ask(fixed_distributions=...)`` or Ray's dict-style space);
  conditional parameters are left out unless asked for, since a static dict cannot express them.
- :func:`define_by_run`: the function Ray Tune's ``OptunaSearch(space=...)`` calls with an
  ``optuna.Trial``; it suggests each active parameter (parents before children) and returns the
  fixed values, which Ray merges into the trial config.
- :func:`enqueue`: ``study.enqueue_trial`` for each warm-start point, for plain Optuna use (Ray's
  ``OptunaSearch`` does the same with ``points_to_evaluate=space.warm_start_points``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from search_spaces.schema import CategoricalParameter, FloatParameter, IntParameter

if TYPE_CHECKING:  # pragma: no cover
    from search_spaces.schema import SearchSpace

__all__ = ["to_distribution", "to_optuna_distributions", "suggest", "define_by_run", "enqueue", "sample_configs"]


def to_distribution(param: FloatParameter | IntParameter | CategoricalParameter) -> BaseDistribution:
    """The Optuna distribution of one parameter."""
    if isinstance(param, CategoricalParameter):
        return CategoricalDistribution(list(param.choices))
    if isinstance(param, IntParameter):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step)
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def to_optuna_distributions(space: SearchSpace, include_conditional: bool = False) -> dict[str, BaseDistribution]:
    return {
        name: to_distribution(space.parameters[name])
        for name in space.names
        if include_conditional or not space.parameters[name].condition
    }


def suggest(trial: optuna.Trial, name: str, param: FloatParameter | IntParameter | CategoricalParameter) -> Any:
    """``trial.suggest_*`` for one parameter."""
    if isinstance(param, CategoricalParameter):
        return trial.suggest_categorical(name, list(param.choices))
    if isinstance(param, IntParameter):
        return trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
    return trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)


def define_by_run(space: SearchSpace, trial: optuna.Trial) -> dict[str, Any]:
    """Suggest the active parameters; return a copy of the fixed values."""
    sampled: dict[str, Any] = {}
    for name in space.names:
        if space.is_active(name, sampled):
            sampled[name] = suggest(trial, name, space.parameters[name])
    return copy.deepcopy(space.fixed)


def enqueue(space: SearchSpace, study: optuna.Study, skip_if_exists: bool = True) -> int:
    """Enqueue the warm-start points so that the study evaluates them first. With
    ``skip_if_exists`` (default) a point already in the study (e.g. a resumed study) is not added
    again. Returns the number of points."""
    points = space.warm_start_points
    for point in points:
        study.enqueue_trial(point, skip_if_exists=skip_if_exists)
    return len(points)


def sample_configs(
    space: SearchSpace,
    n: int,
    seed: int | None = 0,
    sampler: optuna.samplers.BaseSampler | None = None,
    warm_start: bool = True,
) -> list[dict[str, Any]]:
    """``n`` full trial configs (sampled values + fixed values), warm-start points first, drawn with
    ``sampler`` (default ``RandomSampler(seed)``) in a throw-away in-memory study; a preview of what
    a sweep would run."""
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=seed))
    if warm_start:
        enqueue(space, study)
    configs = []
    for _ in range(n):
        trial = study.ask()
        fixed = define_by_run(space, trial)
        configs.append({**trial.params, **fixed})
        study.tell(trial, 0.0)
    return configs
