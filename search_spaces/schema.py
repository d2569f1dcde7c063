"""The search-space schema: pydantic models, validation with precise errors, YAML (de)serialisation.

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

Validation collects every problem and raises one :class:`SearchSpaceError` whose ``.errors`` is a list
of ``{"loc": [...], "msg": "..."}`` (stable, JSON-serialisable: the service returns it as its 422 body)
and whose message has one line per error, e.g.
``parameters.lam: low must be < high (low=0.1, high=0.01)``.

This module imports nothing of ours; the Optuna conversions live in :mod:`search_spaces.optuna`.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
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

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "TRIAL_CONFIG_KEYS",
    "PARAMETER_TYPES",
    "Choice",
    "SearchSpaceError",
    "FloatParameter",
    "IntParameter",
    "CategoricalParameter",
    "Parameter",
    "SearchSpace",
    "format_loc",
    "parse_yaml",
]

# The flat trial-config keys of docs/contracts.md, in the table's order. trainables keeps the
# authoritative list (trainables.config); a test checks that the two agree.
TRIAL_CONFIG_KEYS: tuple[str, ...] = (
    "lam",
    "theta",
    "nu",
    "lr",
    "lr_slow_ratio",
    "momentum",
    "weight_decay",
    "optimizer",
    "adam_beta2",
    "latent_lr_ratio",
    "latent_weight_decay",
    "schedule",
    "lr_milestones",
    "lr_gamma",
    "warmup_epochs",
    "feature_loss_start_epoch",
    "center_lr",
    "mu_sigma_update",
    "latent_init_scale",
    "w_init",
    "ste_clip",
    "act_clip",
    "model",
    "width",
    "block_style",
    "shortcut",
    "dropout",
    "binarize",
    "dataset",
    "data_root",
    "epochs",
    "batch_size",
    "seed",
    "val_fraction",
    "device",
    "amp",
    "channels_last",
    "compile",
    "cuda_graph",
    "fused_bonn",
    "hist_epochs",
    "num_threads",
)

PARAMETER_TYPES: tuple[str, ...] = ("float", "int", "categorical")

#: A categorical choice, a condition value or a warm-start value (what Optuna's
#: CategoricalDistribution accepts).
Choice = Union[None, StrictBool, StrictInt, StrictFloat, StrictStr]

_FIELDS: dict[str, tuple[str, ...]] = {
    "float": ("type", "low", "high", "log", "step", "condition"),
    "int": ("type", "low", "high", "log", "step", "condition"),
    "categorical": ("type", "choices", "condition"),
}
_SPACE_FIELDS = ("name", "description", "parameters", "fixed", "warm_start")
# Optuna's own test of "on the step grid" (FloatDistribution._contains).
_GRID_ATOL = 1.0e-8


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def format_loc(loc: list[str | int] | tuple[str | int, ...]) -> str:
    """The part of ``loc`` that names the thing in error: ``parameters.lam``, ``fixed.model``,
    ``warm_start[0].lam``; the rest of ``loc`` (the field) is named by the message itself."""
    if not loc:
        return ""
    depth = {"parameters": 2, "fixed": 2, "warm_start": 3}.get(str(loc[0]), 1)
    out = ""
    for part in loc[:depth]:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class SearchSpaceError(ValueError):
    """An invalid search space (or a file/preset that cannot be read).

    ``.errors``: ``[{"loc": ["parameters", "lam", "low"], "msg": "low must be < high (low=0.1,
    high=0.01)"}, ...]``, every problem found (parameters, conditions, fixed values, warm-start
    points, in that order). ``.source``: the file or preset the space came from, if any.
    ``str(err)`` has one line per error (see :attr:`lines`).
    """

    def __init__(self, errors: list[dict[str, Any]], source: str | None = None) -> None:
        self.errors: list[dict[str, Any]] = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", [])], "msg": str(e["msg"])}
            for e in errors
        ]
        self.source = source
        super().__init__("\n".join(self.lines))

    @property
    def lines(self) -> list[str]:
        """One human-readable line per error: ``[<source>: ]<where>: <msg>``."""
        out = []
        for e in self.errors:
            where = format_loc(e["loc"])
            line = f"{where}: {e['msg']}" if where else e["msg"]
            out.append(f"{self.source}: {line}" if self.source else line)
        return out

    def with_source(self, source: str | None) -> SearchSpaceError:
        return SearchSpaceError(self.errors, source=source)

    def prefixed(self, *prefix: str | int) -> SearchSpaceError:
        """The same errors with ``prefix`` put in front of every ``loc`` (e.g. ``"search_space"`` when
        the space sits inside a StudySpec)."""
        return SearchSpaceError(
            [{"loc": [*prefix, *e["loc"]], "msg": e["msg"]} for e in self.errors], source=self.source
        )

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> SearchSpaceError:
        """Turn a pydantic ``ValidationError`` raised while validating a space (or a model holding
        one) into a ``SearchSpaceError``, unwrapping the ``SearchSpaceError`` pydantic wrapped."""
        errors: list[dict[str, Any]] = []
        for e in exc.errors():
            loc = [p for p in e.get("loc", ()) if p not in PARAMETER_TYPES]  # drop union tags
            inner = (e.get("ctx") or {}).get("error")
            if isinstance(inner, SearchSpaceError):
                errors.extend({"loc": [*loc, *x["loc"]], "msg": x["msg"]} for x in inner.errors)
            else:
                msg = e.get("msg", "invalid")
                if "input" in e and e.get("type") != "missing":
                    msg += f" (got {_fmt(e['input'])})"
                errors.append({"loc": loc, "msg": msg})
        return cls(errors)


def _fmt(value: Any) -> str:
    """Values in messages, written as in YAML/JSON for scalars (``null``, ``true``) and Python reprs
    otherwise, so that strings stay quoted: ``'bonn'``, ``1e-06``, ``[0.001, 'a']``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_fmt(k)}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (int, float, str)):
        return repr(value)
    return f"<{type(value).__name__}>"


class _Errors(list):
    def add(self, loc: list[str | int], msg: str) -> None:
        self.append({"loc": list(loc), "msg": msg})


# ----------------------------------------------------------------------------------------------
# Normalisation and validation of raw data (dicts from YAML / JSON / Python)
# ----------------------------------------------------------------------------------------------


def _as_float(value: Any) -> float | None:
    """A number, or a numeric string (YAML 1.1 reads ``1e-4`` as a string); never a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    f = _as_float(value)
    if f is None or not math.isfinite(f) or not f.is_integer():
        return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    return int(f)


def _is_choice(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _key(value: Any) -> tuple[str, Any]:
    """Equality of choices as Optuna sees them, except that bools never equal numbers."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    return (type(value).__name__, value)


def _on_grid(value: float, low: float, step: float) -> bool:
    k = (value - low) / step
    return abs(k - round(k)) < _GRID_ATOL * max(1.0, abs(k))


def _suggest_key(name: Any) -> str:
    close = difflib.get_close_matches(str(name), TRIAL_CONFIG_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _normalize_numeric(kind: str, spec: dict, loc: list, errors: _Errors) -> dict:
    conv = _as_float if kind == "float" else _as_int
    what = "a number" if kind == "float" else "an integer"
    out: dict[str, Any] = {}
    for field in ("low", "high"):
        if field not in spec:
            errors.add([*loc, field], f"{field} is required")
            continue
        value = conv(spec[field])
        if value is None:
            errors.add([*loc, field], f"{field} must be {what} (got {_fmt(spec[field])})")
        elif not math.isfinite(value):
            errors.add([*loc, field], f"{field} must be finite (got {_fmt(value)})")
        else:
            out[field] = value

    log = spec.get("log", False)
    if not isinstance(log, bool):
        errors.add([*loc, "log"], f"log must be true or false (got {_fmt(log)})")
        log = False
    out["log"] = log

    default_step = None if kind == "float" else 1
    step = spec.get("step", default_step)
    step_ok = False
    if step is not None:
        value = conv(step)
        if value is None:
            errors.add([*loc, "step"], f"step must be {what} (got {_fmt(step)})")
        elif not math.isfinite(value):
            errors.add([*loc, "step"], f"step must be finite (got {_fmt(value)})")
        elif value <= 0:
            errors.add([*loc, "step"], f"step must be > 0 (step={_fmt(value)})")
        else:
            step, step_ok = value, True
    out["step"] = step if step_ok else default_step

    low, high = out.get("low"), out.get("high")
    if low is not None and high is not None:
        if low >= high:
            errors.add([*loc, "low"], f"low must be < high (low={_fmt(low)}, high={_fmt(high)})")
        elif log and kind == "float" and low <= 0:
            errors.add([*loc, "low"], f"log=true requires low > 0 (low={_fmt(low)}, high={_fmt(high)})")
        elif log and kind == "int" and low < 1:
            errors.add([*loc, "low"], f"log=true requires low >= 1 (low={_fmt(low)}, high={_fmt(high)})")
    if log and step_ok and step != default_step and (kind == "float" or step != 1):
        errors.add([*loc, "step"], f"step cannot be combined with log=true (step={_fmt(step)})")
    elif step_ok and low is not None and high is not None and low < high:
        divides = ((high - low) % step == 0) if kind == "int" else _on_grid(high, low, step)
        if not divides:
            errors.add(
                [*loc, "step"],
                f"step must divide high - low (low={_fmt(low)}, high={_fmt(high)}, step={_fmt(step)})",
            )
    return out


def _normalize_choices(spec: dict, loc: list, errors: _Errors) -> list | None:
    if "choices" not in spec:
        errors.add([*loc, "choices"], "choices is required")
        return None
    choices = spec["choices"]
    if not isinstance(choices, (list, tuple)):
        errors.add([*loc, "choices"], f"choices must be a list (got {_fmt(choices)})")
        return None
    if len(choices) == 0:
        errors.add([*loc, "choices"], "choices must not be empty")
        return None
    seen: dict[tuple, int] = {}
    ok = True
    for i, choice in enumerate(choices):
        if not _is_choice(choice):
            errors.add([*loc, "choices", i], f"choice must be null, a bool, a number or a string (got {_fmt(choice)})")
            ok = False
        elif isinstance(choice, float) and not math.isfinite(choice):
            errors.add([*loc, "choices", i], f"choice must be finite (got {_fmt(choice)})")
            ok = False
        elif _key(choice) in seen:
            errors.add([*loc, "choices", i], f"duplicate choice {_fmt(choice)} (same as index {seen[_key(choice)]})")
            ok = False
        else:
            seen[_key(choice)] = i
    return list(choices) if ok else None


def _normalize_condition(condition: Any, loc: list, errors: _Errors) -> dict | None:
    """Shape only (a mapping of names to one value or a list of values); whether the names and
    values exist is checked against the whole space."""
    loc = [*loc, "condition"]
    if not isinstance(condition, dict):
        errors.add(loc, f"condition must be a mapping {{parameter: value or [values]}} (got {_fmt(condition)})")
        return None
    if not condition:
        errors.add(loc, "condition must name at least one parameter")
        return None
    out: dict[str, list] = {}
    ok = True
    for parent, values in condition.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            errors.add([*loc, str(parent)], "condition values must not be empty")
            ok = False
        elif not all(_is_choice(v) for v in values):
            errors.add(
                [*loc, str(parent)], f"condition values must be null, bools, numbers or strings (got {_fmt(values)})"
            )
            ok = False
        else:
            out[str(parent)] = values
    return out if ok else None


def _normalize_parameter(spec: Any, loc: list, errors: _Errors) -> dict | None:
    """Check one parameter's own fields; the canonical dict, or None if it has errors."""
    if isinstance(spec, _ParameterBase):
        spec = spec.model_dump()
    if not isinstance(spec, dict):
        errors.add(loc, f"a parameter must be a mapping with a type ({', '.join(PARAMETER_TYPES)}) (got {_fmt(spec)})")
        return None
    if "type" not in spec:
        errors.add([*loc, "type"], f"type is required (one of {', '.join(PARAMETER_TYPES)})")
        return None
    kind = spec["type"]
    if kind not in _FIELDS:
        errors.add([*loc, "type"], f"type must be one of {', '.join(PARAMETER_TYPES)} (got {_fmt(kind)})")
        return None
    n_before = len(errors)
    for field in spec:
        if field not in _FIELDS[kind]:
            allowed = ", ".join(_FIELDS[kind][1:])
            errors.add([*loc, str(field)], f"unknown field {str(field)!r} for a {kind} parameter (allowed: {allowed})")
    out: dict[str, Any] = {"type": kind}
    if kind == "categorical":
        out["choices"] = _normalize_choices(spec, loc, errors)
    else:
        out.update(_normalize_numeric(kind, spec, loc, errors))
    condition = spec.get("condition")
    out["condition"] = None if condition is None else _normalize_condition(condition, loc, errors)
    return out if len(errors) == n_before else None


def _is_json_data(value: Any) -> bool:
    if _is_choice(value):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, (list, tuple)):
        return all(_is_json_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_data(v) for k, v in value.items())
    return False


def _normalize_value(param: dict, value: Any) -> tuple[Any, str | None]:
    """A warm-start value checked against its parameter: (canonical value, None) or (None, msg)."""
    kind = param["type"]
    if kind == "categorical":
        for choice in param["choices"]:
            if _is_choice(value) and _key(choice) == _key(value):
                return choice, None
        return None, f"value {_fmt(value)} is not among the choices {_fmt(param['choices'])}"
    conv, what = (_as_float, "a number") if kind == "float" else (_as_int, "an integer")
    v = conv(value)
    if v is None:
        return None, f"value must be {what} (got {_fmt(value)})"
    if not math.isfinite(v):
        return None, f"value must be finite (got {_fmt(v)})"
    low, high, step = param["low"], param["high"], param["step"]
    if not low <= v <= high:
        return None, f"value {_fmt(v)} is outside [{_fmt(low)}, {_fmt(high)}]"
    off_grid = (v - low) % step != 0 if kind == "int" else step is not None and not _on_grid(v, low, step)
    if off_grid:
        return None, f"value {_fmt(v)} is not on the grid low + k*step (low={_fmt(low)}, step={_fmt(step)})"
    return v, None


def _normalize_space(data: Any) -> dict[str, Any]:
    """Validate a whole raw space; return its canonical dict or raise :class:`SearchSpaceError`."""
    if isinstance(data, SearchSpace):
        return data.model_dump()
    if not isinstance(data, dict):
        raise SearchSpaceError(
            [{"loc": [], "msg": f"a search space must be a mapping with 'parameters' (got {_fmt(data)})"}]
        )
    errors = _Errors()
    for key in data:
        if key not in _SPACE_FIELDS:
            errors.add([str(key)], f"unknown field {str(key)!r} (allowed: {', '.join(_SPACE_FIELDS)})")

    name = data.get("name", "custom")
    if not isinstance(name, str) or not name.strip():
        errors.add(["name"], f"name must be a non-empty string (got {_fmt(name)})")
    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        errors.add(["description"], f"description must be a string (got {_fmt(description)})")

    # -- parameters: each one on its own
    raw_params = data.get("parameters")
    params: dict[str, dict] = {}  # the valid ones
    names: list[str] = []  # every name, valid or not
    if raw_params is None:
        errors.add(["parameters"], "parameters is required (a mapping of trial-config keys to parameters)")
        raw_params = {}
    elif not isinstance(raw_params, dict):
        errors.add(
            ["parameters"], f"parameters must be a mapping of trial-config keys to parameters (got {_fmt(raw_params)})"
        )
        raw_params = {}
    elif not raw_params:
        errors.add(["parameters"], "parameters must define at least one parameter")
    for pname, spec in raw_params.items():
        loc = ["parameters", str(pname)]
        names.append(str(pname))
        known = isinstance(pname, str) and pname in TRIAL_CONFIG_KEYS
        if not known:
            errors.add(loc, f"{str(pname)!r} is not a trial-config key{_suggest_key(pname)}")
        p = _normalize_parameter(spec, loc, errors)
        if p is not None and known:
            params[pname] = p

    # -- conditions: refer to a searched categorical parameter and to its choices, no cycles
    conditions_ok = True
    for pname, p in params.items():
        for parent, values in (p["condition"] or {}).items():
            loc = ["parameters", pname, "condition", parent]
            if parent == pname:
                errors.add(loc, "a parameter cannot be conditional on itself")
            elif parent not in names:
                if isinstance(data.get("fixed"), dict) and parent in data["fixed"]:
                    errors.add(loc, f"condition refers to {parent!r}, which is fixed, not searched")
                else:
                    errors.add(loc, f"condition refers to unknown parameter {parent!r}")
            elif parent not in params:
                pass  # the parent's own errors are reported already
            elif params[parent]["type"] != "categorical":
                errors.add(loc, f"condition parameter {parent!r} must be categorical (it is {params[parent]['type']})")
            else:
                choices = params[parent]["choices"]
                keys = {_key(c) for c in choices}
                for v in values:
                    if _key(v) not in keys:
                        errors.add(
                            loc, f"condition value {_fmt(v)} is not among the choices of {parent!r} ({_fmt(choices)})"
                        )
                        conditions_ok = False
                continue
            conditions_ok = False
    if conditions_ok:
        cycle = _find_cycle({n: list((p["condition"] or {}).keys()) for n, p in params.items()})
        if cycle:
            conditions_ok = False
            errors.add(["parameters", cycle[0], "condition"], f"conditions form a cycle: {' -> '.join(cycle)}")

    # -- fixed values
    fixed = data.get("fixed")
    if fixed is None:
        fixed = {}
    if not isinstance(fixed, dict):
        errors.add(["fixed"], f"fixed must be a mapping of trial-config keys to values (got {_fmt(fixed)})")
        fixed = {}
    for key, value in fixed.items():
        loc = ["fixed", str(key)]
        if not isinstance(key, str) or key not in TRIAL_CONFIG_KEYS:
            errors.add(loc, f"{str(key)!r} is not a trial-config key{_suggest_key(key)}")
        elif key in names:
            errors.add(loc, f"{key!r} is both fixed and searched (remove it from fixed or from parameters)")
        elif not _is_json_data(value):
            errors.add(
                loc,
                "a fixed value must be null, a bool, a finite number, a string, or a list/mapping of those"
                f" (got {_fmt(value)})",
            )

    # -- warm-start points
    warm_start = data.get("warm_start")
    if warm_start is None:
        warm_start = []
    points: list[dict] = []
    if not isinstance(warm_start, (list, tuple)):
        errors.add(
            ["warm_start"], f"warm_start must be a list of mappings {{parameter: value}} (got {_fmt(warm_start)})"
        )
        warm_start = []
    for i, point in enumerate(warm_start):
        if not isinstance(point, dict):
            errors.add(
                ["warm_start", i], f"a warm-start point must be a mapping {{parameter: value}} (got {_fmt(point)})"
            )
            continue
        if not point:
            errors.add(["warm_start", i], "a warm-start point must set at least one parameter")
            continue
        out: dict[str, Any] = {}
        for key, value in point.items():
            loc = ["warm_start", i, str(key)]
            if key in params:
                v, msg = _normalize_value(params[key], value)
                if msg:
                    errors.add(loc, msg)
                else:
                    out[key] = v
            elif key in names:
                pass  # an invalid parameter, reported already
            elif key in fixed:
                errors.add(loc, f"{str(key)!r} is fixed, not searched")
            else:
                searched = ", ".join(names) or "none"
                errors.add(loc, f"unknown parameter {str(key)!r} (searched: {searched})")
        if conditions_ok:
            for key in out:
                for parent, values in (params[key]["condition"] or {}).items():
                    if parent in out and _key(out[parent]) not in {_key(v) for v in values}:
                        errors.add(
                            ["warm_start", i, key],
                            f"{key!r} is only searched when {parent} in {_fmt(values)}, "
                            f"but this point has {parent}={_fmt(out[parent])}",
                        )
        points.append(out)

    if errors:
        raise SearchSpaceError(errors)
    return {
        "name": name,
        "description": description,
        "parameters": params,
        "fixed": copy.deepcopy(dict(fixed)),
        "warm_start": points,
    }


def _find_cycle(parents: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for p in parents.get(n, []):
            if state.get(p) == 1:
                return stack[stack.index(p) :] + [p]
            if p not in state:
                found = visit(p)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in parents:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class _ParameterBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        kind = cls.model_fields["type"].default
        if isinstance(data, dict) and "type" not in data:
            data = {"type": kind, **data}
        errors = _Errors()
        out = _normalize_parameter(data, [], errors)
        if errors:
            raise SearchSpaceError(errors)
        if out["type"] != kind:
            raise SearchSpaceError([{"loc": ["type"], "msg": f"type must be {kind!r} (got {out['type']!r})"}])
        return out

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


class IntParameter(_ParameterBase):
    """``trial.suggest_int(name, low, high, log=log, step=step)``."""

    type: Literal["int"] = "int"
    low: int
    high: int
    log: bool = False
    step: int = 1
    condition: dict[str, list[Choice]] | None = None


class CategoricalParameter(_ParameterBase):
    """``trial.suggest_categorical(name, choices)``."""

    type: Literal["categorical"] = "categorical"
    choices: list[Choice]
    condition: dict[str, list[Choice]] | None = None


Parameter = Annotated[Union[FloatParameter, IntParameter, CategoricalParameter], Field(discriminator="type")]


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
        return _normalize_space(data)

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
            if parent not in params or _key(params[parent]) not in {_key(v) for v in values}:
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

    # -- Optuna (see search_spaces.optuna) --------------------------------------------------------

    def to_optuna_distributions(self, include_conditional: bool = False) -> dict[str, Any]:
        """``{name: optuna BaseDistribution}`` of the unconditional parameters (all of them with
        ``include_conditional=True``)."""
        from search_spaces.optuna import to_optuna_distributions

        return to_optuna_distributions(self, include_conditional=include_conditional)

    def define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every active parameter with ``trial.suggest_*`` (parents first; a parameter whose
        condition is false is not suggested) and return a copy of :attr:`fixed`. Pass the bound method
        as Ray Tune's ``OptunaSearch(space=space.define_by_run)``."""
        from search_spaces.optuna import define_by_run

        return define_by_run(self, trial)

    def enqueue(self, study: optuna.Study, skip_if_exists: bool = True) -> int:
        """``study.enqueue_trial`` each warm-start point (plain Optuna use); returns how many."""
        from search_spaces.optuna import enqueue

        return enqueue(self, study, skip_if_exists=skip_if_exists)

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
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)


# ----------------------------------------------------------------------------------------------
# YAML: a safe loader that reads 1e-4 as a number and refuses duplicate keys
# ----------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader + YAML 1.2 floats without a dot (``1e-4``, ``1E5``, which YAML 1.1 and so PyYAML read
    as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    pass


def _repr_float(dumper: yaml.SafeDumper, value: float) -> yaml.Node:
    # PyYAML writes 1e-06 as 1.0e-06 (readable by YAML 1.1); keep that, but write short reprs.
    if math.isfinite(value):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mant, exp = text.split("e")
            text = f"{mant}.0e{exp}"
        return dumper.represent_scalar("tag:yaml.org,2002:float", text)
    return dumper.represent_float(value)


_Dumper.add_representer(float, _repr_float)


def _duplicate_keys(node: yaml.Node, path: list[str | int], seen: set[int]) -> list[dict[str, Any]]:
    if id(node) in seen:
        return []
    seen.add(id(node))
    errors: list[dict[str, Any]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in first:
                    errors.append(
                        {
                            "loc": [*path, key],
                            "msg": f"duplicate key {key!r} (line {line}; first defined at line {first[key]})",
                        }
                    )
                else:
                    first[key] = line
                errors += _duplicate_keys(value_node, [*path, key], seen)
            else:
                errors += _duplicate_keys(value_node, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            errors += _duplicate_keys(item, [*path, i], seen)
    return errors


def parse_yaml(text: str, source: str | None = None) -> Any:
    """Parse YAML (or JSON) text: ``1e-4`` is a float, duplicate keys raise
    :class:`SearchSpaceError` (``loc`` = the key's path), syntax errors raise it with the line and
    column (``loc`` = ``[]``)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        errors = _duplicate_keys(node, [], set())
        if errors:
            raise SearchSpaceError(errors, source=source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SearchSpaceError([{"loc": [], "msg": f"YAML syntax error{where}: {problem}"}], source=source) from None
    finally:
        loader.dispose()
