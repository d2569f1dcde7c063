"""Search space -> Optuna: distributions, and a preview of the configs a sweep would run.

All imports are absolute, so this module's name never shadows the ``optuna`` package. This is the
only module of the package that imports Optuna; it depends on :mod:`search_spaces.models`, never the
other way round (sampling itself, :meth:`SearchSpace.define_by_run` and :meth:`SearchSpace.enqueue`,
only calls the trial's / study's methods).

- :func:`to_distribution` / :func:`to_optuna_distributions`: ``{name: FloatDistribution |
  IntDistribution | CategoricalDistribution}`` (for ``study.ask(fixed_distributions=...)`` or Ray's
  dict-style space); conditional parameters are left out unless asked for, since a static dict
  cannot express them.
- :func:`sample_configs`: ``n`` trial configs drawn in a throw-away in-memory study.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from search_spaces.models import CategoricalParameter, FloatParameter, IntParameter, SearchSpace

__all__ = ["to_distribution", "to_optuna_distributions", "sample_configs"]


def to_distribution(param: FloatParameter | IntParameter | CategoricalParameter) -> BaseDistribution:
    """The Optuna distribution of one parameter."""
    if isinstance(param, CategoricalParameter):
        return CategoricalDistribution(list(param.choices))
    if isinstance(param, IntParameter):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step)
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def to_optuna_distributions(space: SearchSpace, include_conditional: bool = False) -> dict[str, BaseDistribution]:
    """``{name: BaseDistribution}`` of the unconditional parameters (all of them with
    ``include_conditional=True``), in sampling order."""
    return {
        name: to_distribution(space.parameters[name])
        for name in space.names
        if include_conditional or not space.parameters[name].condition
    }


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
        space.enqueue(study)
    configs = []
    for _ in range(n):
        trial = study.ask()
        fixed = space.define_by_run(trial)
        configs.append({**trial.params, **fixed})
        study.tell(trial, 0.0)
    return configs
