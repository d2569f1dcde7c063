"""Declarative search spaces for bonn-sweep: what to search, as data (YAML or JSON), never as code.

    import search_spaces
    space = search_spaces.load("bonn-paper")          # preset name, YAML path, or dict
    OptunaSearch(space=space.define_by_run, points_to_evaluate=space.warm_start_points, ...)

See :mod:`search_spaces.schema` for the format and the validation rules, :mod:`search_spaces.optuna`
for the conversion to Optuna, and ``bonn-sweep spaces --help`` (:mod:`search_spaces.cli`).
This package imports nothing else of bonn-sweep.
"""

from search_spaces.loading import describe_presets, list_presets, load, load_file, load_preset, load_yaml, preset_text
from search_spaces.schema import (
    TRIAL_CONFIG_KEYS,
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    Parameter,
    SearchSpace,
    SearchSpaceError,
)

__all__ = [
    "TRIAL_CONFIG_KEYS",
    "CategoricalParameter",
    "FloatParameter",
    "IntParameter",
    "Parameter",
    "SearchSpace",
    "SearchSpaceError",
    "describe_presets",
    "list_presets",
    "load",
    "load_file",
    "load_preset",
    "load_yaml",
    "preset_text",
]
