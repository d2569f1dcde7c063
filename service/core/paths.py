"""Paths in a StudySpec stay inside the configured data directories (``Settings.data_dirs``).

The only path a trial config holds is ``data_root`` (trainables/config.py). It can come from
``base``, from the search space's ``fixed`` values, or be searched (a categorical over paths); each
occurrence is checked. A path must be absolute, and its real path (``os.path.realpath``: ``..``
collapsed and every existing symlink followed) must lie in the real path of one of the data
directories, so neither ``/data/../etc`` nor a symlink inside a data directory that points outside
gets through. What the trial later opens is the same path: keep the data directories writable by
trusted users only (a symlink swapped in after the check is outside what the API can see).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PATH_KEYS = ("data_root",)


class PathNotAllowed(ValueError):
    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def spec_paths(spec: Any) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """``(loc, path)`` for every path a study's trials could receive (loc as in a 422's ``loc``)."""
    space = spec.space
    fixed = dict(getattr(space, "fixed", {}) or {})
    for key in PATH_KEYS:
        if spec.base.get(key) is not None:
            yield ("body", "base", key), spec.base[key]
        if fixed.get(key) is not None:
            yield ("body", "search_space", "fixed", key), fixed[key]
        param = (getattr(space, "parameters", {}) or {}).get(key)
        if param is not None:
            for i, choice in enumerate(getattr(param, "choices", None) or []):
                if choice is not None:
                    yield ("body", "search_space", "parameters", key, "choices", i), choice


def confine(value: Any, data_dirs: Iterable[Path], loc: tuple[str | int, ...]) -> str:
    """The real path of ``value`` if it lies in one of ``data_dirs``; :class:`PathNotAllowed` otherwise."""
    dirs = [Path(os.path.realpath(d)) for d in data_dirs]
    allowed = ", ".join(str(d) for d in dirs) or "(none)"
    field = ".".join(str(p) for p in loc if p != "body")
    if not isinstance(value, str) or not value:
        raise PathNotAllowed(loc, f"{field}: must be a non-empty path string")
    if "\x00" in value:
        raise PathNotAllowed(loc, f"{field}: NUL byte in path")
    if not os.path.isabs(value):
        raise PathNotAllowed(
            loc, f"{field}: must be an absolute path inside the data directories ({allowed}); got {value!r}"
        )
    real = Path(os.path.realpath(value))
    if any(real == d or real.is_relative_to(d) for d in dirs):
        return str(real)
    how = "resolves (symlinks followed, '..' collapsed) to" if str(real) != value else "is"
    raise PathNotAllowed(
        loc,
        f"{field}: {value!r} {how} {str(real)!r}, outside the allowed data directories ({allowed}; "
        "setting BONN_SWEEP_DATA_DIRS)",
    )


def check_spec_paths(spec: Any, data_dirs: Iterable[Path]) -> None:
    dirs = list(data_dirs)
    for loc, value in spec_paths(spec):
        confine(value, dirs, loc)
