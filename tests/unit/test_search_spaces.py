"""search_spaces: schema validation (tables of valid / invalid spaces with their exact errors), YAML,
presets, Optuna conversion and sampling, warm start, JSON round trip, CLI."""

from __future__ import annotations

import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pydantic
import pytest

import search_spaces
from search_spaces import (
    TRIAL_CONFIG_KEYS,
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    SearchSpace,
    SearchSpaceError,
    list_presets,
    load,
    load_yaml,
)
from search_spaces.cli import main
from search_spaces.errors import format_loc
from search_spaces.optuna import sample_configs, to_distribution, to_optuna_distributions
from search_spaces.yaml_io import parse_yaml

REPO = Path(__file__).resolve().parents[2]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def F(low, high, **kw):
    return {"type": "float", "low": low, "high": high, **kw}


def I(low, high, **kw):  # noqa: E743
    return {"type": "int", "low": low, "high": high, **kw}


def C(*choices, **kw):
    return {"type": "categorical", "choices": list(choices), **kw}


def space(parameters, **kw):
    return {"name": "t", "parameters": parameters, **kw}


def errors_of(data) -> list[tuple[list, str]]:
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.model_validate(data)
    return [(e["loc"], e["msg"]) for e in info.value.errors]


# ----------------------------------------------------------------------------------------------
# TRIAL_CONFIG_KEYS
# ----------------------------------------------------------------------------------------------


def test_trial_config_keys_match_contracts_table():
    text = (REPO / "docs" / "contracts.md").read_text()
    section = text.split("## Trial config", 1)[1].split("\n## ", 1)[0]
    keys = re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)
    assert keys, "no table rows found in docs/contracts.md"
    assert tuple(keys) == TRIAL_CONFIG_KEYS
    assert len(set(TRIAL_CONFIG_KEYS)) == len(TRIAL_CONFIG_KEYS)


def test_package_imports_nothing_of_ours():
    code = (
        "import sys, search_spaces, search_spaces.cli, search_spaces.optuna; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('service', 'trainables')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_optuna_module_does_not_shadow_optuna():
    import search_spaces.optuna as conv

    assert conv.optuna is optuna
    assert conv.optuna.__file__ != conv.__file__


# ----------------------------------------------------------------------------------------------
# Valid spaces
# ----------------------------------------------------------------------------------------------

VALID = [
    ("float", {"lam": F(1e-6, 1e-2)}, {"lam": FloatParameter(low=1e-6, high=1e-2)}),
    ("float log", {"lam": F(1e-6, 1e-2, log=True)}, {"lam": FloatParameter(low=1e-6, high=1e-2, log=True)}),
    (
        "float step, float error in range",
        {"dropout": F(0.0, 0.3, step=0.1)},
        {"dropout": FloatParameter(low=0.0, high=0.3, step=0.1)},
    ),
    (
        "float step 0.1 over 0..1",
        {"momentum": F(0, 0.9, step=0.1)},
        {"momentum": FloatParameter(low=0.0, high=0.9, step=0.1)},
    ),
    (
        "int bounds given as float/strings",
        {"width": I(16.0, "64", step=16)},
        {"width": IntParameter(low=16, high=64, step=16)},
    ),
    ("int log", {"batch_size": I(32, 512, log=True)}, {"batch_size": IntParameter(low=32, high=512, log=True)}),
    (
        "int log with step 1",
        {"batch_size": I(32, 512, log=True, step=1)},
        {"batch_size": IntParameter(low=32, high=512, log=True)},
    ),
    (
        "numeric strings (YAML 1.1 reads 1e-4 as str)",
        {"lam": F("1e-6", " 1e-2 ", log=True, step=None)},
        {"lam": FloatParameter(low=1e-6, high=1e-2, log=True)},
    ),
    ("int as low of a float", {"lr": F(0, 1)}, {"lr": FloatParameter(low=0.0, high=1.0)}),
    (
        "categorical of mixed types",
        {"amp": C(None, True, "auto")},
        {"amp": CategoricalParameter(choices=[None, True, "auto"])},
    ),
    ("categorical numbers", {"lam": C(1e-3, 1e-4, 0)}, {"lam": CategoricalParameter(choices=[1e-3, 1e-4, 0])}),
    ("categorical bool and int are distinct", {"seed": C(1, True)}, {"seed": CategoricalParameter(choices=[1, True])}),
    (
        "condition, scalar value",
        {"binarize": C("bonn", "xnor"), "theta": F(1e-5, 1e-1, log=True, condition={"binarize": "bonn"})},
        {
            "binarize": CategoricalParameter(choices=["bonn", "xnor"]),
            "theta": FloatParameter(low=1e-5, high=1e-1, log=True, condition={"binarize": ["bonn"]}),
        },
    ),
    (
        "condition, list of values",
        {"schedule": C("step", "cosine"), "lr_gamma": F(0.1, 0.5, condition={"schedule": ["step"]})},
        {
            "schedule": CategoricalParameter(choices=["step", "cosine"]),
            "lr_gamma": FloatParameter(low=0.1, high=0.5, condition={"schedule": ["step"]}),
        },
    ),
    (
        "nested condition, child declared first",
        {
            "lr_gamma": F(0.1, 0.5, condition={"schedule": "step"}),
            "schedule": C("step", "cosine", condition={"binarize": "bonn"}),
            "binarize": C("bonn", "xnor"),
        },
        {
            "lr_gamma": FloatParameter(low=0.1, high=0.5, condition={"schedule": ["step"]}),
            "schedule": CategoricalParameter(choices=["step", "cosine"], condition={"binarize": ["bonn"]}),
            "binarize": CategoricalParameter(choices=["bonn", "xnor"]),
        },
    ),
    (
        "parameter given as a model",
        {"lam": FloatParameter(low=1e-6, high=1e-2, log=True)},
        {"lam": FloatParameter(low=1e-6, high=1e-2, log=True)},
    ),
]


@pytest.mark.parametrize("parameters, expected", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_parameters(parameters, expected):
    s = SearchSpace.model_validate(space(parameters))
    assert s.parameters == expected
    assert SearchSpace.model_validate_json(s.model_dump_json()) == s


def test_valid_space_fixed_and_warm_start_are_normalised():
    s = SearchSpace.model_validate(
        {
            "parameters": {
                "lam": F(1e-6, 1e-2, log=True),
                "width": I(16, 64, step=16),
                "binarize": C("bonn", "xnor"),
                "theta": F(1e-5, 1e-1, log=True, condition={"binarize": "bonn"}),
            },
            "fixed": {"lr_milestones": [0.3, 0.6, 0.8], "data_root": None, "amp": "auto"},
            "warm_start": [{"lam": "1e-4", "width": 32.0}, {"binarize": "xnor"}, {"binarize": "bonn", "theta": 1e-3}],
        }
    )
    assert s.name == "custom" and s.description == ""
    assert s.fixed == {"lr_milestones": [0.3, 0.6, 0.8], "data_root": None, "amp": "auto"}
    assert s.warm_start_points == [
        {"lam": 1e-4, "width": 32},
        {"binarize": "xnor"},
        {"binarize": "bonn", "theta": 1e-3},
    ]
    assert type(s.warm_start_points[0]["width"]) is int
    assert s.names == ["lam", "width", "binarize", "theta"]
    assert s.conditional_names == ["theta"]
    s.warm_start_points[0]["lam"] = 5  # a copy
    assert s.warm_start[0]["lam"] == 1e-4


def test_direct_construction():
    s = SearchSpace(name="x", parameters={"lam": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}})
    assert s.parameters["lam"] == FloatParameter(low=1e-6, high=1e-2, log=True)
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace(name="x", parameters={"lam": {"type": "float", "low": 1, "high": 0}})
    assert info.value.errors == [{"loc": ["parameters", "lam", "low"], "msg": "low must be < high (low=1.0, high=0.0)"}]


# ----------------------------------------------------------------------------------------------
# Invalid spaces: every error, exactly
# ----------------------------------------------------------------------------------------------

P = "parameters"
INVALID = [
    ("low >= high", space({"lam": F(0.1, 0.01)}), [([P, "lam", "low"], "low must be < high (low=0.1, high=0.01)")]),
    ("low == high", space({"lam": F(0.1, 0.1)}), [([P, "lam", "low"], "low must be < high (low=0.1, high=0.1)")]),
    ("int low >= high", space({"width": I(64, 16)}), [([P, "width", "low"], "low must be < high (low=64, high=16)")]),
    (
        "log with low = 0",
        space({"lam": F(0, 1e-2, log=True)}),
        [([P, "lam", "low"], "log=true requires low > 0 (low=0.0, high=0.01)")],
    ),
    (
        "log with low < 0",
        space({"lam": F(-1, 1e-2, log=True)}),
        [([P, "lam", "low"], "log=true requires low > 0 (low=-1.0, high=0.01)")],
    ),
    (
        "int log with low = 0",
        space({"width": I(0, 64, log=True)}),
        [([P, "width", "low"], "log=true requires low >= 1 (low=0, high=64)")],
    ),
    (
        "log with step",
        space({"lam": F(1e-4, 1e-2, log=True, step=1e-4)}),
        [([P, "lam", "step"], "step cannot be combined with log=true (step=0.0001)")],
    ),
    (
        "int log with step",
        space({"width": I(16, 64, log=True, step=16)}),
        [([P, "width", "step"], "step cannot be combined with log=true (step=16)")],
    ),
    (
        "float step does not divide",
        space({"dropout": F(0.0, 1.0, step=0.3)}),
        [([P, "dropout", "step"], "step must divide high - low (low=0.0, high=1.0, step=0.3)")],
    ),
    (
        "int step does not divide",
        space({"width": I(16, 64, step=10)}),
        [([P, "width", "step"], "step must divide high - low (low=16, high=64, step=10)")],
    ),
    ("step <= 0", space({"dropout": F(0.0, 0.5, step=0)}), [([P, "dropout", "step"], "step must be > 0 (step=0.0)")]),
    ("NaN bound", space({"lam": F(float("nan"), 1.0)}), [([P, "lam", "low"], "low must be finite (got nan)")]),
    ("infinite bound", space({"lam": F(0.0, float("inf"))}), [([P, "lam", "high"], "high must be finite (got inf)")]),
    ("NaN as a string", space({"lam": F("nan", 1.0)}), [([P, "lam", "low"], "low must be finite (got nan)")]),
    ("non-numeric bound", space({"lam": F("small", 1.0)}), [([P, "lam", "low"], "low must be a number (got 'small')")]),
    ("bool bound", space({"lam": F(0.0, True)}), [([P, "lam", "high"], "high must be a number (got true)")]),
    (
        "int with a fractional bound",
        space({"width": I(1.5, 8)}),
        [([P, "width", "low"], "low must be an integer (got 1.5)")],
    ),
    (
        "missing bounds",
        space({"lam": {"type": "float"}}),
        [([P, "lam", "low"], "low is required"), ([P, "lam", "high"], "high is required")],
    ),
    (
        "log not a bool",
        space({"lam": F(1e-4, 1e-2, log="yes")}),
        [([P, "lam", "log"], "log must be true or false (got 'yes')")],
    ),
    (
        "missing type",
        space({"lam": {"low": 1, "high": 2}}),
        [([P, "lam", "type"], "type is required (one of float, int, categorical)")],
    ),
    (
        "unknown type",
        space({"lam": {"type": "loguniform", "low": 1, "high": 2}}),
        [([P, "lam", "type"], "type must be one of float, int, categorical (got 'loguniform')")],
    ),
    (
        "parameter not a mapping",
        space({"lam": 1e-4}),
        [([P, "lam"], "a parameter must be a mapping with a type (float, int, categorical) (got 0.0001)")],
    ),
    (
        "unknown field of a parameter",
        space({"lam": F(1, 2, lo=1)}),
        [([P, "lam", "lo"], "unknown field 'lo' for a float parameter (allowed: low, high, log, step, condition)")],
    ),
    (
        "bounds on a categorical",
        space({"lam": C(1, 2, low=1)}),
        [([P, "lam", "low"], "unknown field 'low' for a categorical parameter (allowed: choices, condition)")],
    ),
    ("empty choices", space({"schedule": C()}), [([P, "schedule", "choices"], "choices must not be empty")]),
    (
        "missing choices",
        space({"schedule": {"type": "categorical"}}),
        [([P, "schedule", "choices"], "choices is required")],
    ),
    (
        "choices not a list",
        space({"schedule": {"type": "categorical", "choices": "step"}}),
        [([P, "schedule", "choices"], "choices must be a list (got 'step')")],
    ),
    (
        "duplicate choices",
        space({"binarize": C("bonn", "xnor", "bonn")}),
        [([P, "binarize", "choices", 2], "duplicate choice 'bonn' (same as index 0)")],
    ),
    (
        "duplicate numeric choices 1 and 1.0",
        space({"seed": C(1, 1.0)}),
        [([P, "seed", "choices", 1], "duplicate choice 1.0 (same as index 0)")],
    ),
    (
        "list as a choice",
        space({"lr_milestones": C([0.3, 0.6], [0.5])}),
        [
            ([P, "lr_milestones", "choices", 0], "choice must be null, a bool, a number or a string (got [0.3, 0.6])"),
            ([P, "lr_milestones", "choices", 1], "choice must be null, a bool, a number or a string (got [0.5])"),
        ],
    ),
    (
        "NaN choice",
        space({"lam": C(1e-4, float("nan"))}),
        [([P, "lam", "choices", 1], "choice must be finite (got nan)")],
    ),
    (
        "name not a trial-config key",
        space({"lamda": F(1e-6, 1e-2)}),
        [([P, "lamda"], "'lamda' is not a trial-config key (did you mean 'lam'?)")],
    ),
    ("name far from every key", space({"xyzzy": F(1e-6, 1e-2)}), [([P, "xyzzy"], "'xyzzy' is not a trial-config key")]),
    ("no parameters", {"name": "t", "parameters": {}}, [([P], "parameters must define at least one parameter")]),
    (
        "parameters missing",
        {"name": "t"},
        [([P], "parameters is required (a mapping of trial-config keys to parameters)")],
    ),
    (
        "parameters not a mapping",
        {"parameters": [F(0, 1)]},
        [
            (
                [P],
                "parameters must be a mapping of trial-config keys to parameters"
                " (got [{'type': 'float', 'low': 0, 'high': 1}])",
            )
        ],
    ),
    (
        "unknown top-level field",
        {"name": "t", "parameters": {"lam": F(0, 1)}, "params": {}},
        [(["params"], "unknown field 'params' (allowed: name, description, parameters, fixed, warm_start)")],
    ),
    (
        "empty name",
        {"name": "", "parameters": {"lam": F(0, 1)}},
        [(["name"], "name must be a non-empty string (got '')")],
    ),
    ("space not a mapping", ["lam"], [([], "a search space must be a mapping with 'parameters' (got ['lam'])")]),
    (
        "condition on an unknown parameter",
        space({"theta": F(0, 1, condition={"feature_loss": True})}),
        [([P, "theta", "condition", "feature_loss"], "condition refers to unknown parameter 'feature_loss'")],
    ),
    (
        "condition on a fixed value",
        space({"theta": F(0, 1, condition={"binarize": "bonn"})}, fixed={"binarize": "bonn"}),
        [([P, "theta", "condition", "binarize"], "condition refers to 'binarize', which is fixed, not searched")],
    ),
    (
        "condition on a value not among the choices",
        space({"binarize": C("bonn", "xnor"), "theta": F(0, 1, condition={"binarize": "bnn"})}),
        [
            (
                [P, "theta", "condition", "binarize"],
                "condition value 'bnn' is not among the choices of 'binarize' (['bonn', 'xnor'])",
            )
        ],
    ),
    (
        "condition on a non-categorical parameter",
        space({"lr": F(0.01, 1), "momentum": F(0, 0.9, condition={"lr": 0.1})}),
        [([P, "momentum", "condition", "lr"], "condition parameter 'lr' must be categorical (it is float)")],
    ),
    (
        "condition on itself",
        space({"schedule": C("step", "cosine", condition={"schedule": "step"})}),
        [([P, "schedule", "condition", "schedule"], "a parameter cannot be conditional on itself")],
    ),
    (
        "empty condition",
        space({"theta": F(0, 1, condition={})}),
        [([P, "theta", "condition"], "condition must name at least one parameter")],
    ),
    (
        "condition not a mapping",
        space({"theta": F(0, 1, condition="binarize == bonn")}),
        [
            (
                [P, "theta", "condition"],
                "condition must be a mapping {parameter: value or [values]} (got 'binarize == bonn')",
            )
        ],
    ),
    (
        "condition with no values",
        space({"binarize": C("bonn"), "theta": F(0, 1, condition={"binarize": []})}),
        [([P, "theta", "condition", "binarize"], "condition values must not be empty")],
    ),
    (
        "conditions form a cycle",
        space(
            {
                "schedule": C("step", "cosine", condition={"binarize": "bonn"}),
                "binarize": C("bonn", "xnor", condition={"schedule": "step"}),
            }
        ),
        [([P, "schedule", "condition"], "conditions form a cycle: schedule -> binarize -> schedule")],
    ),
    (
        "fixed value also searched",
        space({"lam": F(1e-6, 1e-2, log=True)}, fixed={"lam": 1e-4}),
        [(["fixed", "lam"], "'lam' is both fixed and searched (remove it from fixed or from parameters)")],
    ),
    (
        "fixed key not a trial-config key",
        space({"lam": F(0, 1)}, fixed={"modle": "wrn22"}),
        [(["fixed", "modle"], "'modle' is not a trial-config key (did you mean 'model'?)")],
    ),
    (
        "fixed value not JSON data",
        space({"lam": F(0, 1)}, fixed={"epochs": {3}}),
        [
            (
                ["fixed", "epochs"],
                "a fixed value must be null, a bool, a finite number, a string, or a list/mapping of those (got <set>)",
            )
        ],
    ),
    (
        "fixed not a mapping",
        space({"lam": F(0, 1)}, fixed=["model"]),
        [(["fixed"], "fixed must be a mapping of trial-config keys to values (got ['model'])")],
    ),
    (
        "several errors, in order",
        space({"lam": F(0.1, 0.01), "theta": F(0, 1, log=True), "nu": C()}, fixed={"lam": 0}),
        [
            ([P, "lam", "low"], "low must be < high (low=0.1, high=0.01)"),
            ([P, "theta", "low"], "log=true requires low > 0 (low=0.0, high=1.0)"),
            ([P, "nu", "choices"], "choices must not be empty"),
            (["fixed", "lam"], "'lam' is both fixed and searched (remove it from fixed or from parameters)"),
        ],
    ),
]


@pytest.mark.parametrize("data, expected", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spaces(data, expected):
    assert errors_of(data) == expected


WS_SPACE = {
    "lam": F(1e-6, 1e-2, log=True),
    "dropout": F(0.0, 0.5, step=0.1),
    "width": I(16, 64, step=16),
    "binarize": C("bonn", "xnor"),
    "theta": F(1e-5, 1e-1, log=True, condition={"binarize": "bonn"}),
}
W = "warm_start"
INVALID_WARM_START = [
    (
        "unknown key",
        [{"lamda": 1e-4}],
        [([W, 0, "lamda"], "unknown parameter 'lamda' (searched: lam, dropout, width, binarize, theta)")],
    ),
    ("fixed key", [{"model": "wrn22"}], [([W, 0, "model"], "'model' is fixed, not searched")]),
    ("float above high", [{"lam": 0.1}], [([W, 0, "lam"], "value 0.1 is outside [1e-06, 0.01]")]),
    ("float below low", [{"lam": 0}], [([W, 0, "lam"], "value 0.0 is outside [1e-06, 0.01]")]),
    (
        "off the step grid",
        [{"dropout": 0.15}],
        [([W, 0, "dropout"], "value 0.15 is not on the grid low + k*step (low=0.0, step=0.1)")],
    ),
    (
        "int off the step grid",
        [{"width": 24}],
        [([W, 0, "width"], "value 24 is not on the grid low + k*step (low=16, step=16)")],
    ),
    ("int not an integer", [{"width": 32.5}], [([W, 0, "width"], "value must be an integer (got 32.5)")]),
    ("not a number", [{"lam": "small"}], [([W, 0, "lam"], "value must be a number (got 'small')")]),
    ("NaN", [{"lam": float("nan")}], [([W, 0, "lam"], "value must be finite (got nan)")]),
    (
        "not among the choices",
        [{"binarize": "bnn"}],
        [([W, 0, "binarize"], "value 'bnn' is not among the choices ['bonn', 'xnor']")],
    ),
    (
        "conditional parameter set while its condition is false",
        [{"binarize": "xnor", "theta": 1e-3}],
        [([W, 0, "theta"], "'theta' is only searched when binarize in ['bonn'], but this point has binarize='xnor'")],
    ),
    ("empty point", [{}], [([W, 0], "a warm-start point must set at least one parameter")]),
    (
        "point not a mapping",
        [[1e-4]],
        [([W, 0], "a warm-start point must be a mapping {parameter: value} (got [0.0001])")],
    ),
    (
        "warm_start not a list",
        {"lam": 1e-4},
        [([W], "warm_start must be a list of mappings {parameter: value} (got {'lam': 0.0001})")],
    ),
    ("second point", [{"lam": 1e-4}, {"lam": 1.0}], [([W, 1, "lam"], "value 1.0 is outside [1e-06, 0.01]")]),
]


@pytest.mark.parametrize(
    "warm_start, expected", [c[1:] for c in INVALID_WARM_START], ids=[c[0] for c in INVALID_WARM_START]
)
def test_invalid_warm_start(warm_start, expected):
    assert errors_of(space(WS_SPACE, fixed={"model": "wrn22"}, warm_start=warm_start)) == expected


VALID_WARM_START = [
    ("bounds inclusive", [{"lam": 1e-6}, {"lam": 1e-2}], [{"lam": 1e-6}, {"lam": 1e-2}]),
    ("on the grid, float error", [{"dropout": 0.3}], [{"dropout": 0.3}]),
    ("numeric strings", [{"lam": "1e-4", "width": "32"}], [{"lam": 1e-4, "width": 32}]),
    ("conditional, condition true", [{"binarize": "bonn", "theta": 1e-3}], [{"binarize": "bonn", "theta": 1e-3}]),
    ("conditional, parent left to the sampler", [{"theta": 1e-3}], [{"theta": 1e-3}]),
]


@pytest.mark.parametrize(
    "warm_start, expected", [c[1:] for c in VALID_WARM_START], ids=[c[0] for c in VALID_WARM_START]
)
def test_valid_warm_start(warm_start, expected):
    assert SearchSpace.model_validate(space(WS_SPACE, warm_start=warm_start)).warm_start_points == expected


# ----------------------------------------------------------------------------------------------
# SearchSpaceError
# ----------------------------------------------------------------------------------------------


def test_error_message_lines_and_json():
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.model_validate(space({"lam": F(0.1, 0.01)}, warm_start=[{"lamx": 1}]))
    err = info.value
    assert isinstance(err, ValueError)
    assert (
        str(err).splitlines()
        == err.lines
        == [
            "parameters.lam: low must be < high (low=0.1, high=0.01)",
            "warm_start[0].lamx: unknown parameter 'lamx' (searched: lam)",
        ]
    )
    assert json.loads(json.dumps(err.errors)) == err.errors
    assert err.prefixed("search_space").errors[0]["loc"] == ["search_space", "parameters", "lam", "low"]


@pytest.mark.parametrize(
    "loc, expected",
    [
        ([], ""),
        (["name"], "name"),
        (["parameters"], "parameters"),
        (["parameters", "lam", "low"], "parameters.lam"),
        (["parameters", "lam", "condition", "binarize"], "parameters.lam"),
        (["fixed", "model"], "fixed.model"),
        (["warm_start", 2, "lam"], "warm_start[2].lam"),
        (["warm_start", 2], "warm_start[2]"),
    ],
)
def test_format_loc(loc, expected):
    assert format_loc(loc) == expected


def test_error_inside_another_pydantic_model():
    """A StudySpec-like model that embeds a SearchSpace: pydantic wraps our error; it unwraps."""

    class Spec(pydantic.BaseModel):
        search_space: SearchSpace

    with pytest.raises(pydantic.ValidationError) as info:
        Spec.model_validate({"search_space": space({"lam": F(0.1, 0.01)})})
    err = SearchSpaceError.from_validation_error(info.value)
    assert err.errors == [
        {"loc": ["search_space", "parameters", "lam", "low"], "msg": "low must be < high (low=0.1, high=0.01)"}
    ]
    ok = Spec.model_validate({"search_space": space({"lam": F(0.01, 0.1)})})
    assert ok.search_space.parameters["lam"].high == 0.1


def test_parameter_models_validate_themselves():
    with pytest.raises(pydantic.ValidationError, match=r"low must be < high \(low=2.0, high=1.0\)"):
        FloatParameter(low=2, high=1)
    with pytest.raises(pydantic.ValidationError, match="type must be 'int'"):
        IntParameter(type="float", low=1, high=2)


# ----------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------


def test_yaml_reads_exponent_floats_without_dot():
    s = load_yaml(
        """
parameters:
  lam: {type: float, low: 1e-6, high: 1E-2, log: true}
  theta: {type: categorical, choices: [1e-2, 1e-3, 1.0e-4, 0]}
  nu: {type: float, low: 1e-6, high: 1e-2, log: true}
fixed: {lr: 1e-2, seed: 1}
warm_start: [{lam: 1e-4, theta: 1e-3, nu: +1e-4}]
"""
    )
    assert s.parameters["lam"] == FloatParameter(low=1e-6, high=1e-2, log=True)
    assert s.parameters["theta"].choices == [1e-2, 1e-3, 1e-4, 0]
    assert s.fixed == {"lr": 0.01, "seed": 1}
    assert type(s.fixed["seed"]) is int
    assert s.warm_start_points == [{"lam": 1e-4, "theta": 1e-3, "nu": 1e-4}]


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-4", 1e-4),
        ("1E5", 1e5),
        ("-2e-3", -2e-3),
        ("1.5e3", 1500.0),
        (".5e-1", 0.05),
        ("1.0e-4", 1e-4),
        ("12", 12),
        ("1e", "1e"),
        ("e5", "e5"),
        ("'1e-4'", "1e-4"),
    ],
)
def test_yaml_scalar_resolution(text, value):
    parsed = parse_yaml(f"x: {text}")["x"]
    assert parsed == value and type(parsed) is type(value)


DUPLICATES = [
    (
        "top-level key",
        "name: a\nname: b\nparameters: {lam: {type: float, low: 0, high: 1}}\n",
        [(["name"], "duplicate key 'name' (line 2; first defined at line 1)")],
    ),
    (
        "parameter name",
        "parameters:\n  lam: {type: float, low: 0, high: 1}\n  theta: {type: float, low: 0, high: 1}\n"
        "  lam: {type: float, low: 0, high: 2}\n",
        [(["parameters", "lam"], "duplicate key 'lam' (line 4; first defined at line 2)")],
    ),
    (
        "field of a parameter",
        "parameters:\n  lam: {type: float, low: 0, high: 1, low: 0.5}\n",
        [(["parameters", "lam", "low"], "duplicate key 'low' (line 2; first defined at line 2)")],
    ),
    (
        "key of a warm-start point",
        "parameters: {lam: {type: float, low: 0, high: 1}}\nwarm_start:\n  - {lam: 0.1, lam: 0.2}\n",
        [(["warm_start", 0, "lam"], "duplicate key 'lam' (line 3; first defined at line 3)")],
    ),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in DUPLICATES], ids=[c[0] for c in DUPLICATES])
def test_yaml_duplicate_keys(text, expected):
    with pytest.raises(SearchSpaceError) as info:
        load_yaml(text)
    assert [(e["loc"], e["msg"]) for e in info.value.errors] == expected


def test_yaml_syntax_error_is_one_error():
    with pytest.raises(SearchSpaceError) as info:
        load_yaml("parameters:\n  lam: {type: float, low: 1\n", source="my.yaml")
    assert info.value.errors == [
        {"loc": [], "msg": "YAML syntax error at line 3, column 1: expected ',' or '}', but got '<stream end>'"}
    ]
    assert (
        str(info.value) == "my.yaml: YAML syntax error at line 3, column 1: expected ',' or '}', but got '<stream end>'"
    )


def test_yaml_source_prefixes_schema_errors():
    with pytest.raises(SearchSpaceError) as info:
        load_yaml("parameters: {lam: {type: float, low: 1, high: 0}}", source="s.yaml")
    assert info.value.lines == ["s.yaml: parameters.lam: low must be < high (low=1.0, high=0.0)"]
    assert info.value.errors[0]["loc"] == ["parameters", "lam", "low"]


def test_yaml_empty_document():
    with pytest.raises(SearchSpaceError, match=r"a search space must be a mapping with 'parameters' \(got null\)"):
        load_yaml("")


def test_json_text_is_yaml():
    s = load_yaml('{"parameters": {"lam": {"type": "float", "low": 1e-6, "high": 1e-2, "log": true}}}')
    assert s.parameters["lam"] == FloatParameter(low=1e-6, high=1e-2, log=True)


# ----------------------------------------------------------------------------------------------
# JSON round trip
# ----------------------------------------------------------------------------------------------

ROUND_TRIP = [load(n) for n in list_presets()] + [
    SearchSpace.model_validate(
        space(
            WS_SPACE,
            fixed={"lr_milestones": [0.3, 0.6], "data_root": None},
            warm_start=[{"binarize": "bonn", "theta": 1e-3}, {"width": 48}],
        )
    ),
    SearchSpace.model_validate(space({"amp": C(None, True, "auto", 1, 2.5), "seed": I(0, 10)})),
]


@pytest.mark.parametrize("s", ROUND_TRIP, ids=[s.name + str(i) for i, s in enumerate(ROUND_TRIP)])
def test_json_round_trip(s):
    assert SearchSpace.model_validate_json(s.model_dump_json()) == s
    assert SearchSpace.model_validate(json.loads(json.dumps(s.model_dump()))) == s
    assert SearchSpace.model_validate(s.model_dump()) == s
    assert load_yaml(s.to_yaml()) == s
    assert load(s.to_dict()) == s
    assert pickle.loads(pickle.dumps(s)) == s


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def test_preset_names():
    assert {"bonn-paper", "bonn-paper-grid", "digits-smoke"} <= set(list_presets())
    assert list_presets() == sorted(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates(name):
    s = load(name)
    assert s.name == name
    assert s.description.strip()
    assert search_spaces.load_preset(name) == s
    assert dict(search_spaces.describe_presets())[name] == s.description


PAPER = {"lam": 1e-4, "theta": 1e-3, "nu": 1e-4, "lr": 0.01, "weight_decay": 5e-4}


def test_bonn_paper_preset_brackets_paper_values_by_100x():
    s = load("bonn-paper")
    assert set(s.parameters) == set(PAPER) | {"optimizer", "latent_init_scale"}
    assert s.parameters["optimizer"].choices == ["sgd", "adam"]
    assert s.parameters["latent_init_scale"].low == 0.03 and s.parameters["latent_init_scale"].high == 1.0
    for name, value in PAPER.items():
        p = s.parameters[name]
        assert isinstance(p, FloatParameter) and p.log and p.condition is None
        assert math.isclose(p.low, value / 100) and math.isclose(p.high, value * 100), name
    assert s.warm_start_points == [{**PAPER, "optimizer": "sgd", "latent_init_scale": 1.0}]
    assert s.fixed == {"binarize": "bonn"}


def test_bonn_paper_grid_preset():
    s = load("bonn-paper-grid")
    assert s.grid() == {"lam": [1e-3, 1e-4, 1e-5, 0.0], "theta": [1e-2, 1e-3, 1e-4, 0.0]}
    assert s.grid_size() == 16
    assert s.fixed["nu"] == 1e-4


def test_digits_smoke_preset():
    s = load("digits-smoke")
    assert set(s.parameters) == {"lam", "theta", "nu"}
    assert all(p.log for p in s.parameters.values())
    assert s.fixed["model"] == "small_cnn" and s.fixed["dataset"] == "digits" and s.fixed["epochs"] <= 5
    assert s.warm_start_points == [{"lam": 1e-4, "theta": 1e-3, "nu": 1e-4}]


def test_load_errors(tmp_path):
    with pytest.raises(SearchSpaceError, match=r"'bonn-papr' is neither a preset \(bonn-paper, .*\) nor a file"):
        load("bonn-papr")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SearchSpaceError) as info:
        load(str(missing))
    assert info.value.errors == [{"loc": [], "msg": f"{missing}: file not found"}]
    with pytest.raises(SearchSpaceError, match="is a directory"):
        load(tmp_path)
    with pytest.raises(SearchSpaceError, match="unknown preset 'x'"):
        search_spaces.preset_text("x")
    with pytest.raises(SearchSpaceError, match="got int"):
        load(3)  # type: ignore[arg-type]


def test_load_file_and_passthrough(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(load("digits-smoke").to_yaml())
    assert load(path) == load(str(path)) == load("digits-smoke")
    s = load("digits-smoke")
    assert load(s) is s


# ----------------------------------------------------------------------------------------------
# Optuna
# ----------------------------------------------------------------------------------------------


def check_config(s: SearchSpace, params: dict, fixed: dict) -> None:
    """Every sampled value inside its bounds/choices; conditional parameters present iff active."""
    assert fixed == s.fixed
    assert not set(params) & set(fixed)
    active: dict = {}
    for name in s.names:
        p = s.parameters[name]
        if not s.is_active(name, active):
            assert name not in params, f"{name} sampled although its condition is false: {params}"
            continue
        assert name in params
        v = params[name]
        if isinstance(p, CategoricalParameter):
            assert v in p.choices
        else:
            assert p.low <= v <= p.high
            if isinstance(p, IntParameter):
                assert isinstance(v, int) and (v - p.low) % p.step == 0
            elif p.step is not None:
                assert abs((v - p.low) / p.step - round((v - p.low) / p.step)) < 1e-8
        active[name] = v


SAMPLER_SPACES = [load(n) for n in list_presets()] + [
    SearchSpace.model_validate(
        space(
            {
                "binarize": C("bonn", "xnor", "none"),
                "schedule": C("step", "cosine", condition={"binarize": ["bonn", "xnor"]}),
                "lr_gamma": F(0.1, 0.5, step=0.1, condition={"schedule": "step"}),
                "width": I(16, 64, step=16),
                "batch_size": I(32, 256, log=True),
                "dropout": F(0.0, 0.3),
            },
            name="nested",
        )
    ),
]
SAMPLERS = {
    "tpe": lambda: optuna.samplers.TPESampler(seed=0, n_startup_trials=5),
    "tpe-multivariate": lambda: optuna.samplers.TPESampler(seed=1, n_startup_trials=5, multivariate=True, group=True),
    "random": lambda: optuna.samplers.RandomSampler(seed=0),
}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("s", SAMPLER_SPACES, ids=[s.name for s in SAMPLER_SPACES])
def test_sampling_stays_in_bounds_and_respects_conditions(s, sampler):
    study = optuna.create_study(sampler=SAMPLERS[sampler](), direction="maximize")
    seen = []

    def objective(trial):
        fixed = s.define_by_run(trial)
        check_config(s, trial.params, fixed)
        seen.append(dict(trial.params))
        return sum(hash(str(v)) % 97 for v in trial.params.values())

    study.optimize(objective, n_trials=25)
    assert len(seen) == 25
    for name in s.conditional_names:  # both branches occur
        assert any(name in p for p in seen) and any(name not in p for p in seen), name


def test_sampling_is_reproducible_with_a_seed():
    s = load("bonn-paper")
    a = sample_configs(s, 8, seed=3, warm_start=False)
    b = sample_configs(s, 8, seed=3, warm_start=False)
    assert a == b and a != sample_configs(s, 8, seed=4, warm_start=False)


def test_conditional_parameters_absent_when_condition_false():
    s = load("bonn-vs-baselines")
    configs = sample_configs(s, 40, seed=0, warm_start=False)
    for c in configs:
        if c["binarize"] == "bonn":
            assert {"lam", "theta", "nu"} <= set(c)
        else:
            assert not {"lam", "theta", "nu"} & set(c)
    assert {c["binarize"] for c in configs} == {"bonn", "xnor", "none"}


def test_define_by_run_returns_a_copy_of_fixed():
    s = SearchSpace.model_validate(space({"lam": F(0, 1)}, fixed={"lr_milestones": [0.3, 0.6]}))
    trial = optuna.create_study().ask()
    fixed = s.define_by_run(trial)
    fixed["lr_milestones"].append(0.9)
    assert s.fixed == {"lr_milestones": [0.3, 0.6]}


@pytest.mark.parametrize(
    "param, expected",
    [
        (FloatParameter(low=1e-6, high=1e-2, log=True), optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)),
        (FloatParameter(low=0, high=0.5, step=0.1), optuna.distributions.FloatDistribution(0, 0.5, step=0.1)),
        (IntParameter(low=16, high=64, step=16), optuna.distributions.IntDistribution(16, 64, step=16)),
        (IntParameter(low=1, high=64, log=True), optuna.distributions.IntDistribution(1, 64, log=True)),
        (
            CategoricalParameter(choices=["bonn", "xnor"]),
            optuna.distributions.CategoricalDistribution(["bonn", "xnor"]),
        ),
    ],
)
def test_to_distribution(param, expected):
    assert to_distribution(param) == expected


def test_json_schema_for_api_docs():
    schema = SearchSpace.model_json_schema()
    assert set(schema["properties"]) == {"name", "description", "parameters", "fixed", "warm_start"}


def test_to_optuna_distributions_and_ask():
    s = load("bonn-vs-baselines")
    dists = to_optuna_distributions(s)
    assert list(dists) == ["binarize", "lr", "weight_decay"]
    assert list(to_optuna_distributions(s, include_conditional=True)) == [
        "binarize",
        "lam",
        "theta",
        "nu",
        "lr",
        "weight_decay",
    ]
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(fixed_distributions=dists)
    assert set(trial.params) == set(dists)
    for d in dists.values():
        assert isinstance(d, optuna.distributions.BaseDistribution)
        json.loads(optuna.distributions.distribution_to_json(d))


def test_enqueue_warm_start_points_run_first():
    s = load("bonn-vs-baselines")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    assert s.enqueue(study) == 3
    assert s.enqueue(study) == 3  # skip_if_exists: no duplicates
    study.optimize(lambda t: (s.define_by_run(t), 0.0)[1], n_trials=5)
    params = [t.params for t in study.trials]
    assert params[:3] == s.warm_start_points


def test_grid_sampler_runs_the_whole_grid():
    s = load("bonn-paper-grid")
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(s.grid(), seed=0))
    study.optimize(lambda t: (s.define_by_run(t), 0.0)[1], n_trials=s.grid_size())
    points = {(t.params["lam"], t.params["theta"]) for t in study.trials}
    assert points == {(a, b) for a in [1e-3, 1e-4, 1e-5, 0.0] for b in [1e-2, 1e-3, 1e-4, 0.0]}


GRIDS = [
    (
        "int and stepped float",
        {"width": I(16, 64, step=16), "dropout": F(0.0, 0.3, step=0.1)},
        {"width": [16, 32, 48, 64], "dropout": [0.0, 0.1, 0.2, 0.3]},
    ),
    ("categorical", {"binarize": C("bonn", "xnor")}, {"binarize": ["bonn", "xnor"]}),
]


@pytest.mark.parametrize("parameters, expected", [c[1:] for c in GRIDS], ids=[c[0] for c in GRIDS])
def test_grid(parameters, expected):
    assert SearchSpace.model_validate(space(parameters)).grid() == expected


def test_grid_refuses_continuous_and_conditional_parameters():
    with pytest.raises(SearchSpaceError) as info:
        load("bonn-paper").grid()
    assert info.value.errors[0] == {
        "loc": ["parameters", "lam", "type"],
        "msg": "grid search needs discrete parameters: a continuous float has no grid"
        " (make it categorical or give it a step)",
    }
    assert len(info.value.errors) == 6  # five paper floats and latent_init_scale
    with pytest.raises(SearchSpaceError, match="grid search needs unconditional parameters"):
        SearchSpace.model_validate(
            space({"binarize": C("bonn", "xnor"), "theta": C(1e-3, condition={"binarize": "bonn"})})
        ).grid()


def test_define_by_run_with_ray_optuna_search():
    """The contract's use: OptunaSearch(space=space.define_by_run, points_to_evaluate=...)."""
    tune_optuna = pytest.importorskip("ray.tune.search.optuna")
    s = load("bonn-vs-baselines")
    searcher = tune_optuna.OptunaSearch(
        space=s.define_by_run,
        points_to_evaluate=s.warm_start_points,
        sampler=optuna.samplers.TPESampler(seed=0),
        metric="val_acc",
        mode="max",
    )
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    assert configs[:3] == s.warm_start_points
    for c in configs:
        check_config(s, {k: v for k, v in c.items() if k not in s.fixed}, s.fixed)
    searcher2 = tune_optuna.OptunaSearch(space=load("digits-smoke").define_by_run, metric="val_acc", mode="max")
    c = searcher2.suggest("x")
    assert c["model"] == "small_cnn" and set(c) == {"lam", "theta", "nu"} | set(load("digits-smoke").fixed)
    pickle.loads(pickle.dumps(s.define_by_run))


# ----------------------------------------------------------------------------------------------
# with_fixed (a StudySpec's base)
# ----------------------------------------------------------------------------------------------


def test_with_fixed():
    s = load("digits-smoke").with_fixed({"epochs": 1, "seed": 7})
    assert s.fixed["epochs"] == 1 and s.fixed["seed"] == 7 and s.fixed["model"] == "small_cnn"
    with pytest.raises(SearchSpaceError) as info:
        load("digits-smoke").with_fixed({"lam": 1e-4, "modl": "x"}, loc=("base",))
    assert info.value.errors == [
        {"loc": ["base", "lam"], "msg": "'lam' is searched by space 'digits-smoke'; it cannot also be fixed"}
    ]
    with pytest.raises(SearchSpaceError) as info:
        load("digits-smoke").with_fixed({"modl": "x"}, loc=("base",))
    assert info.value.errors == [
        {"loc": ["base", "modl"], "msg": "'modl' is not a trial-config key (did you mean 'model'?)"}
    ]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert re.search(rf"^{re.escape(name)}\s+\S", out, flags=re.M)
    assert "paper" in out


def test_cli_show(capsys):
    assert main(["show", "bonn-paper"]) == 0
    out = capsys.readouterr().out
    assert load_yaml(out) == load("bonn-paper")
    assert main(["show", "digits-smoke", "--json"]) == 0
    assert SearchSpace.model_validate_json(capsys.readouterr().out) == load("digits-smoke")
    assert main(["show", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "'nope' is neither a preset" in captured.err


def test_cli_validate_ok(tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text("name: mine\nparameters:\n  lam: {type: float, low: 1e-6, high: 1e-2, log: true}\n")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {path}: space 'mine', 1 parameter (lam)")


CLI_ERRORS = [
    (
        "schema errors, one per line",
        "parameters:\n  lam: {type: float, low: 1e-1, high: 1e-2}\n  theta: {type: categorical, choices: []}\n",
        [
            "{p}: parameters.lam: low must be < high (low=0.1, high=0.01)",
            "{p}: parameters.theta: choices must not be empty",
        ],
    ),
    (
        "duplicate key",
        "parameters:\n  lam: {type: float, low: 0, high: 1}\n  lam: {type: float, low: 0, high: 1}\n",
        ["{p}: parameters.lam: duplicate key 'lam' (line 3; first defined at line 2)"],
    ),
    (
        "YAML syntax error",
        "parameters: [\n",
        ["{p}: YAML syntax error at line 2, column 1: expected the node content, but found '<stream end>'"],
    ),
    ("not a mapping", "- lam\n", ["{p}: a search space must be a mapping with 'parameters' (got ['lam'])"]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_validate_errors(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [e.format(p=path) for e in expected]
    assert "Traceback" not in captured.err


def test_cli_validate_missing_file(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().err == f"{path}: file not found\n"


def test_cli_validate_several_files(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(load("digits-smoke").to_yaml())
    assert main(["validate", str(good), "bonn-paper"]) == 0
    assert capsys.readouterr().out.count("OK: ") == 2
    assert main(["validate", str(good), str(tmp_path / "missing.yaml")]) == 1


def test_cli_sample(capsys):
    assert main(["sample", "digits-smoke", "-n", "3", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    configs = [json.loads(line) for line in lines]
    assert len(configs) == 3
    assert {k: configs[0][k] for k in ("lam", "theta", "nu")} == {"lam": 1e-4, "theta": 1e-3, "nu": 1e-4}
    assert all(c["model"] == "small_cnn" for c in configs)


@pytest.mark.parametrize("argv, code", [([], 2), (["frobnicate"], 2), (["--help"], 0), (["show"], 2)])
def test_cli_usage(argv, code, capsys):
    assert main(argv) == code
    capsys.readouterr()


def test_cli_add_spaces_commands(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="bonn-sweep")
    from search_spaces.cli import add_spaces_commands

    add_spaces_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["spaces", "validate", "digits-smoke"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("OK: digits-smoke")
