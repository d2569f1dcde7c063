"""Errors of search spaces: :class:`SearchSpaceError`, how its locations and values are written.

A :class:`SearchSpaceError` carries every problem found as ``{"loc": [...], "msg": "..."}`` (stable,
JSON-serialisable: the service returns the list as its 422 body) and reads as one line per error,
e.g. ``parameters.lam: low must be < high (low=0.1, high=0.01)``. The message texts are an
interface: tests and API clients match them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from search_spaces.keys import PARAMETER_TYPES

__all__ = ["SearchSpaceError", "ErrorList", "format_loc", "fmt_value"]


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


def fmt_value(value: Any) -> str:
    """Values in messages, written as in YAML/JSON for scalars (``null``, ``true``) and Python reprs
    otherwise, so that strings stay quoted: ``'bonn'``, ``1e-06``, ``[0.001, 'a']``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{fmt_value(k)}: {fmt_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (int, float, str)):
        return repr(value)
    return f"<{type(value).__name__}>"


class ErrorList(list):
    """The errors collected while validating one space (validation reports every problem at once)."""

    def add(self, loc: list[str | int], msg: str) -> None:
        self.append({"loc": list(loc), "msg": msg})


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
                    msg += f" (got {fmt_value(e['input'])})"
                errors.append({"loc": loc, "msg": msg})
        return cls(errors)
