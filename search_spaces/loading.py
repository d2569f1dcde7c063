"""Loading search spaces: presets shipped in ``search_spaces/presets/*.yaml``, YAML/JSON files, dicts.

Every failure raises :class:`~search_spaces.errors.SearchSpaceError`: an unknown preset, a missing
or unreadable file and a YAML syntax error are single errors with ``loc == []``; schema errors carry
their ``loc``. Errors from a file or preset have ``.source`` set to its path or name, so that
``str(err)`` reads ``spaces/my.yaml: parameters.lam: low must be < high (low=0.1, high=0.01)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from search_spaces.errors import SearchSpaceError
from search_spaces.models import SearchSpace
from search_spaces.yaml_io import parse_yaml

__all__ = ["list_presets", "describe_presets", "preset_text", "load_preset", "load_yaml", "load_file", "load"]

_SUFFIXES = (".yaml", ".yml", ".json")


def _presets_dir() -> Path:
    # Next to this file (not importlib.resources: that fails when the package is seen as a namespace
    # package, e.g. through an editable install made before __init__.py existed).
    return Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The preset's YAML as shipped (comments included)."""
    if name not in list_presets():
        raise SearchSpaceError([{"loc": [], "msg": f"unknown preset {name!r} (presets: {', '.join(list_presets())})"}])
    return (_presets_dir() / f"{name}.yaml").read_text(encoding="utf-8")


def load_preset(name: str) -> SearchSpace:
    return load_yaml(preset_text(name), source=name)


def describe_presets() -> list[tuple[str, str]]:
    """``[(name, description), ...]`` of every preset."""
    return [(name, load_preset(name).description) for name in list_presets()]


def load_yaml(text: str, source: str | None = None) -> SearchSpace:
    """A space from YAML (or JSON) text; ``source`` names it in error messages."""
    data = parse_yaml(text, source=source)
    try:
        return SearchSpace.model_validate(data)
    except SearchSpaceError as exc:
        raise exc.with_source(source) from None


def load_file(path: str | os.PathLike[str]) -> SearchSpace:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SearchSpaceError([{"loc": [], "msg": f"{source}: file not found"}]) from None
    except IsADirectoryError:
        raise SearchSpaceError([{"loc": [], "msg": f"{source}: is a directory, not a file"}]) from None
    except UnicodeDecodeError:
        raise SearchSpaceError([{"loc": [], "msg": f"{source}: not a UTF-8 text file"}]) from None
    except OSError as exc:
        raise SearchSpaceError([{"loc": [], "msg": f"{source}: cannot read file ({exc.strerror})"}]) from None
    return load_yaml(text, source=source)


def load(spec: str | os.PathLike[str] | dict[str, Any] | SearchSpace) -> SearchSpace:
    """A space from a preset name, a path to a YAML/JSON file, a dict (inline space, e.g. a
    StudySpec's ``search_space``) or a ``SearchSpace`` (returned as is)."""
    if isinstance(spec, SearchSpace):
        return spec
    if isinstance(spec, dict):
        return SearchSpace.model_validate(spec)
    if isinstance(spec, os.PathLike):
        return load_file(spec)
    if isinstance(spec, str):
        if spec in list_presets():
            return load_preset(spec)
        if os.path.exists(spec) or spec.endswith(_SUFFIXES) or os.sep in spec:
            return load_file(spec)
        raise SearchSpaceError(
            [{"loc": [], "msg": f"{spec!r} is neither a preset ({', '.join(list_presets())}) nor a file"}]
        )
    raise SearchSpaceError(
        [{"loc": [], "msg": f"a search space is a preset name, a file path or a mapping (got {type(spec).__name__})"}]
    )
