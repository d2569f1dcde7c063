"""How the CLI reports errors: :class:`CliError` (one message line per item, no traceback, exit code
1) and the lines it makes of an API error response or of a validation exception."""

from __future__ import annotations

import httpx


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 1."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


def error_lines(r: httpx.Response) -> list[str]:
    """``HTTP 422: budget.num_trials: Input should be ...``, one line per error item."""
    try:
        detail = r.json().get("detail")
    except ValueError:
        return [f"HTTP {r.status_code}: {r.text[:500]}"]
    if not isinstance(detail, list):
        return [f"HTTP {r.status_code}: {detail}"]
    out = []
    for d in detail:
        loc = ".".join(str(p) for p in d.get("loc", []) if p != "body")
        out.append(f"HTTP {r.status_code}: {loc + ': ' if loc else ''}{d.get('msg', '')}")
    return out or [f"HTTP {r.status_code}"]


def exception_lines(exc: Exception) -> list[str]:
    """The message lines of an exception (a :class:`search_spaces.SearchSpaceError` has several)."""
    lines = getattr(exc, "lines", None)
    lines = lines() if callable(lines) else lines
    return list(lines) if lines else [str(exc)]
