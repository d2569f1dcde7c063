"""Validation of raw search-space data (dicts from YAML, JSON or Python), as named rules.

Each rule checks one thing, adds what is wrong to an :class:`~search_spaces.errors.ErrorList` and
returns the canonical (normalised) value it could build. :func:`normalize_space` runs them in the
order the errors are reported -- top-level fields, parameters, conditions, fixed values, warm-start
points -- and raises one :class:`SearchSpaceError` with every problem; :func:`normalize_parameter`
checks one parameter on its own. The models (:mod:`search_spaces.models`) call these from their
``before`` validators; this module works on plain data only and knows nothing of them.
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Callable

from search_spaces.errors import ErrorList, SearchSpaceError
from search_spaces.errors import fmt_value as _fmt
from search_spaces.keys import PARAMETER_FIELDS, PARAMETER_TYPES, SPACE_FIELDS, TRIAL_CONFIG_KEYS
from search_spaces.values import as_float, as_int, choice_key, is_choice, is_json_data, on_grid

__all__ = ["normalize_space", "normalize_parameter", "normalize_value", "find_cycle"]


def _suggest_key(name: Any) -> str:
    close = difflib.get_close_matches(str(name), TRIAL_CONFIG_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# One parameter
# ----------------------------------------------------------------------------------------------


def _numeric_kind(kind: str) -> tuple[Callable[[Any], Any], str]:
    return (as_float, "a number") if kind == "float" else (as_int, "an integer")


def _check_bounds(kind: str, spec: dict, loc: list, errors: ErrorList) -> dict[str, Any]:
    """``low`` and ``high``: present, numbers of the kind, finite."""
    conv, what = _numeric_kind(kind)
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
    return out


def _check_log(spec: dict, loc: list, errors: ErrorList) -> bool:
    log = spec.get("log", False)
    if not isinstance(log, bool):
        errors.add([*loc, "log"], f"log must be true or false (got {_fmt(log)})")
        log = False
    return log


def _check_step(kind: str, spec: dict, loc: list, errors: ErrorList) -> tuple[Any, bool]:
    """``(step, step_ok)``: the step given (a positive finite number of the kind) or the default
    (``None`` for float, 1 for int), and whether a valid step was given or defaulted."""
    conv, what = _numeric_kind(kind)
    default_step = None if kind == "float" else 1
    step = spec.get("step", default_step)
    if step is None:
        return default_step, False
    value = conv(step)
    if value is None:
        errors.add([*loc, "step"], f"step must be {what} (got {_fmt(step)})")
    elif not math.isfinite(value):
        errors.add([*loc, "step"], f"step must be finite (got {_fmt(value)})")
    elif value <= 0:
        errors.add([*loc, "step"], f"step must be > 0 (step={_fmt(value)})")
    else:
        return value, True
    return default_step, False


def _check_range(kind: str, out: dict, step_ok: bool, loc: list, errors: ErrorList) -> None:
    """Across fields: ``low < high``, ``log`` needs a positive ``low`` and no step, the step divides
    ``high - low``."""
    low, high, log, step = out.get("low"), out.get("high"), out["log"], out["step"]
    default_step = None if kind == "float" else 1
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
        divides = ((high - low) % step == 0) if kind == "int" else on_grid(high, low, step)
        if not divides:
            errors.add(
                [*loc, "step"],
                f"step must divide high - low (low={_fmt(low)}, high={_fmt(high)}, step={_fmt(step)})",
            )


def _normalize_numeric(kind: str, spec: dict, loc: list, errors: ErrorList) -> dict:
    """A float or int parameter's ``low``, ``high``, ``log``, ``step``."""
    out = _check_bounds(kind, spec, loc, errors)
    out["log"] = _check_log(spec, loc, errors)
    out["step"], step_ok = _check_step(kind, spec, loc, errors)
    _check_range(kind, out, step_ok, loc, errors)
    return out


def _normalize_choices(spec: dict, loc: list, errors: ErrorList) -> list | None:
    """A categorical parameter's ``choices``: a non-empty list of distinct finite scalars."""
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
        if not is_choice(choice):
            errors.add([*loc, "choices", i], f"choice must be null, a bool, a number or a string (got {_fmt(choice)})")
            ok = False
        elif isinstance(choice, float) and not math.isfinite(choice):
            errors.add([*loc, "choices", i], f"choice must be finite (got {_fmt(choice)})")
            ok = False
        elif choice_key(choice) in seen:
            errors.add(
                [*loc, "choices", i], f"duplicate choice {_fmt(choice)} (same as index {seen[choice_key(choice)]})"
            )
            ok = False
        else:
            seen[choice_key(choice)] = i
    return list(choices) if ok else None


def _normalize_condition(condition: Any, loc: list, errors: ErrorList) -> dict | None:
    """Shape only (a mapping of names to one value or a list of values); whether the names and
    values exist is checked against the whole space (:func:`_check_conditions`)."""
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
        elif not all(is_choice(v) for v in values):
            errors.add(
                [*loc, str(parent)], f"condition values must be null, bools, numbers or strings (got {_fmt(values)})"
            )
            ok = False
        else:
            out[str(parent)] = values
    return out if ok else None


def normalize_parameter(spec: Any, loc: list, errors: ErrorList) -> dict | None:
    """Check one parameter's own fields; the canonical dict, or None if it has errors."""
    if not isinstance(spec, dict):
        errors.add(loc, f"a parameter must be a mapping with a type ({', '.join(PARAMETER_TYPES)}) (got {_fmt(spec)})")
        return None
    if "type" not in spec:
        errors.add([*loc, "type"], f"type is required (one of {', '.join(PARAMETER_TYPES)})")
        return None
    kind = spec["type"]
    if kind not in PARAMETER_FIELDS:
        errors.add([*loc, "type"], f"type must be one of {', '.join(PARAMETER_TYPES)} (got {_fmt(kind)})")
        return None
    n_before = len(errors)
    for field in spec:
        if field not in PARAMETER_FIELDS[kind]:
            allowed = ", ".join(PARAMETER_FIELDS[kind][1:])
            errors.add([*loc, str(field)], f"unknown field {str(field)!r} for a {kind} parameter (allowed: {allowed})")
    out: dict[str, Any] = {"type": kind}
    if kind == "categorical":
        out["choices"] = _normalize_choices(spec, loc, errors)
    else:
        out.update(_normalize_numeric(kind, spec, loc, errors))
    condition = spec.get("condition")
    out["condition"] = None if condition is None else _normalize_condition(condition, loc, errors)
    return out if len(errors) == n_before else None


def normalize_value(param: dict, value: Any) -> tuple[Any, str | None]:
    """A warm-start value checked against its parameter: (canonical value, None) or (None, msg)."""
    kind = param["type"]
    if kind == "categorical":
        for choice in param["choices"]:
            if is_choice(value) and choice_key(choice) == choice_key(value):
                return choice, None
        return None, f"value {_fmt(value)} is not among the choices {_fmt(param['choices'])}"
    conv, what = _numeric_kind(kind)
    v = conv(value)
    if v is None:
        return None, f"value must be {what} (got {_fmt(value)})"
    if not math.isfinite(v):
        return None, f"value must be finite (got {_fmt(v)})"
    low, high, step = param["low"], param["high"], param["step"]
    if not low <= v <= high:
        return None, f"value {_fmt(v)} is outside [{_fmt(low)}, {_fmt(high)}]"
    off_grid = (v - low) % step != 0 if kind == "int" else step is not None and not on_grid(v, low, step)
    if off_grid:
        return None, f"value {_fmt(v)} is not on the grid low + k*step (low={_fmt(low)}, step={_fmt(step)})"
    return v, None


# ----------------------------------------------------------------------------------------------
# The whole space, in the order the errors are reported
# ----------------------------------------------------------------------------------------------


def _check_header(data: dict, errors: ErrorList) -> tuple[Any, Any]:
    """Unknown top-level fields, ``name`` and ``description``; returns ``(name, description)``."""
    for key in data:
        if key not in SPACE_FIELDS:
            errors.add([str(key)], f"unknown field {str(key)!r} (allowed: {', '.join(SPACE_FIELDS)})")
    name = data.get("name", "custom")
    if not isinstance(name, str) or not name.strip():
        errors.add(["name"], f"name must be a non-empty string (got {_fmt(name)})")
    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        errors.add(["description"], f"description must be a string (got {_fmt(description)})")
    return name, description


def _check_parameters(data: dict, errors: ErrorList) -> tuple[dict[str, dict], list[str]]:
    """Each parameter on its own; returns ``(valid parameters, every name, valid or not)``."""
    raw_params = data.get("parameters")
    params: dict[str, dict] = {}
    names: list[str] = []
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
        p = normalize_parameter(spec, loc, errors)
        if p is not None and known:
            params[pname] = p
    return params, names


def _check_condition_parent(
    data: dict, params: dict[str, dict], names: list[str], pname: str, parent: str, values: list, errors: ErrorList
) -> bool:
    """One ``condition: {parent: values}`` of ``pname``: the parent is another searched categorical
    parameter and the values are among its choices. Whether it holds."""
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
        keys = {choice_key(c) for c in choices}
        ok = True
        for v in values:
            if choice_key(v) not in keys:
                errors.add(loc, f"condition value {_fmt(v)} is not among the choices of {parent!r} ({_fmt(choices)})")
                ok = False
        return ok
    return False


def _check_conditions(data: dict, params: dict[str, dict], names: list[str], errors: ErrorList) -> bool:
    """Conditions refer to searched categorical parameters and their choices, with no cycle.
    Whether they all hold (warm-start points are checked against them only then)."""
    conditions_ok = True
    for pname, p in params.items():
        for parent, values in (p["condition"] or {}).items():
            if not _check_condition_parent(data, params, names, pname, parent, values, errors):
                conditions_ok = False
    if conditions_ok:
        cycle = find_cycle({n: list((p["condition"] or {}).keys()) for n, p in params.items()})
        if cycle:
            conditions_ok = False
            errors.add(["parameters", cycle[0], "condition"], f"conditions form a cycle: {' -> '.join(cycle)}")
    return conditions_ok


def find_cycle(parents: dict[str, list[str]]) -> list[str] | None:
    """A cycle of the graph ``{node: [parents]}`` as ``[a, b, ..., a]``, or None."""
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


def _check_fixed(data: dict, names: list[str], errors: ErrorList) -> dict:
    """Fixed values: trial-config keys that are not searched, with JSON-like values."""
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
        elif not is_json_data(value):
            errors.add(
                loc,
                "a fixed value must be null, a bool, a finite number, a string, or a list/mapping of those"
                f" (got {_fmt(value)})",
            )
    return fixed


def _check_point(
    i: int, point: dict, params: dict[str, dict], names: list[str], fixed: dict, errors: ErrorList
) -> dict[str, Any]:
    """One warm-start point's values, each against its parameter; the canonical values."""
    out: dict[str, Any] = {}
    for key, value in point.items():
        loc = ["warm_start", i, str(key)]
        if key in params:
            v, msg = normalize_value(params[key], value)
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
    return out


def _check_point_conditions(i: int, out: dict[str, Any], params: dict[str, dict], errors: ErrorList) -> None:
    """A point sets a conditional parameter only where its condition holds for the point's parents."""
    for key in out:
        for parent, values in (params[key]["condition"] or {}).items():
            if parent in out and choice_key(out[parent]) not in {choice_key(v) for v in values}:
                errors.add(
                    ["warm_start", i, key],
                    f"{key!r} is only searched when {parent} in {_fmt(values)}, "
                    f"but this point has {parent}={_fmt(out[parent])}",
                )


def _check_warm_start(
    data: dict, params: dict[str, dict], names: list[str], fixed: dict, conditions_ok: bool, errors: ErrorList
) -> list[dict]:
    """Warm-start points: a list of non-empty mappings of searched parameters to valid values."""
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
        out = _check_point(i, point, params, names, fixed, errors)
        if conditions_ok:
            _check_point_conditions(i, out, params, errors)
        points.append(out)
    return points


def normalize_space(data: Any) -> dict[str, Any]:
    """Validate a whole raw space; return its canonical dict or raise :class:`SearchSpaceError`
    with every problem found."""
    if not isinstance(data, dict):
        raise SearchSpaceError(
            [{"loc": [], "msg": f"a search space must be a mapping with 'parameters' (got {_fmt(data)})"}]
        )
    errors = ErrorList()
    name, description = _check_header(data, errors)
    params, names = _check_parameters(data, errors)
    conditions_ok = _check_conditions(data, params, names, errors)
    fixed = _check_fixed(data, names, errors)
    points = _check_warm_start(data, params, names, fixed, conditions_ok, errors)
    if errors:
        raise SearchSpaceError(errors)
    return {
        "name": name,
        "description": description,
        "parameters": params,
        "fixed": copy.deepcopy(dict(fixed)),
        "warm_start": points,
    }
