"""YAML in and out: a safe loader that reads ``1e-4`` as a number and refuses duplicate keys, and the
dumper that writes spaces back compactly. Every parse failure is a :class:`SearchSpaceError`."""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from search_spaces.errors import SearchSpaceError

__all__ = ["parse_yaml", "dump_yaml"]

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


def dump_yaml(data: Any) -> str:
    """``data`` as block YAML, keys in their order, floats written so that YAML 1.1 reads them back."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)
