"""The Optuna sampler of a StudySpec's ``sampler`` block (``tpe`` | ``gp`` | ``random`` | ``nsga2`` |
``cmaes`` | ``grid``), and the size of a grid sampler's grid."""

from __future__ import annotations

import optuna


def build_sampler(kind: str, seed: int | None, grid: dict[str, list] | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a StudySpec ``sampler`` block."""
    kind = (kind or "tpe").lower()
    if kind == "tpe":
        # optuna 5: multivariate off, constant_liar on by default (parallel trials get a "lie")
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":  # multi-objective (objective.also)
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "sampler 'cmaes' needs the `cmaes` package on the cluster (pip install cmaes)"
            ) from exc
        return optuna.samplers.CmaEsSampler(seed=seed)
    if kind == "grid":
        if not grid:
            raise ValueError("sampler 'grid' needs a non-empty grid (a categorical-only search space)")
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ValueError(f"unknown sampler type {kind!r}")


def grid_size(grid: dict[str, list] | None) -> int:
    n = 1
    for values in (grid or {}).values():
        n *= max(1, len(values))
    return n
