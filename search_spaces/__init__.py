"""Declarative search spaces for bonn-sweep: what to search, as data (YAML or JSON), never as code.

    import search_spaces
    space = search_spaces.load("bonn-paper")          # preset name, YAML path, or dict
    OptunaSearch(space=space.define_by_run, points_to_evaluate=space.warm_start_points, ...)

Modules, each depending only on those above it:

- :mod:`search_spaces.keys`: the trial-config keys, parameter types and allowed fields;
- :mod:`search_spaces.values`: number / choice / grid rules on plain values;
- :mod:`search_spaces.errors`: :class:`SearchSpaceError` and how errors are written;
- :mod:`search_spaces.yaml_io`: safe YAML parsing (``1e-4`` is a float, duplicate keys refused), dumping;
- :mod:`search_spaces.validation`: the validation rules on raw data, one function per rule;
- :mod:`search_spaces.models`: the pydantic models (the format), sampling with a trial, grids;
- :mod:`search_spaces.loading`: presets (``presets/*.yaml``), files, dicts;
- :mod:`search_spaces.optuna`: Optuna distributions and a sampling preview (the only Optuna import);
- :mod:`search_spaces.cli`: ``bonn-sweep spaces ...``.

This package imports nothing else of bonn-sweep.
"""

from search_spaces.errors import SearchSpaceError
from search_spaces.keys import TRIAL_CONFIG_KEYS
from search_spaces.loading import describe_presets, list_presets, load, load_file, load_preset, load_yaml, preset_text
from search_spaces.models import CategoricalParameter, FloatParameter, IntParameter, Parameter, SearchSpace
from search_spaces.yaml_io import parse_yaml

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
    "parse_yaml",
    "preset_text",
]
