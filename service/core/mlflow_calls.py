"""How this project talks to MLflow: the one retry policy, error classification, and params flattening.

Everything here imports ``mlflow`` lazily (or not at all), so the API's import cost is unchanged.

* :func:`mlflow_call` is the single retry policy for MLflow calls: ``tries`` attempts with a backoff
  that doubles from ``backoff_s``; errors MLflow will never accept (:func:`permanent`) are not retried.
  The API uses one attempt (it must answer fast), the study driver three; the driver's MLflow
  callback additionally goes offline on an unreachable server (:func:`unreachable`, :func:`reachable`)
  and queues what it could not send (``service.sweep.outbox``).
* :func:`flatten_params` is the one flattening of a nested dict into MLflow params (the study spec on
  the parent run, the resolved trial config on each trial's run).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

logger = logging.getLogger("bonn_sweep.mlflow")

#: MLflow's limits on a param value and a tag value (characters)
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000


class TrackingError(RuntimeError):
    """MLflow could not be reached or refused a request."""


def mlflow_call(what: str, fn: Callable, *args: Any, tries: int = 3, backoff_s: float = 0.5,
                retry_if: Callable[[BaseException], bool] | None = None,
                warn: Callable[[str], None] | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under the project's MLflow retry policy.

    Up to ``tries`` attempts, sleeping ``backoff_s``, ``2*backoff_s``, ... between them; an error for
    which ``retry_if`` is false (default: a :func:`permanent` one) ends the attempts at once. After the
    last failure the exception is raised -- or, when ``warn`` is given, reported through it as
    ``warning: MLflow <what> failed: ...`` and ``None`` is returned (callers that must never stop).
    """
    retry_if = retry_if or (lambda exc: not permanent(exc))
    delay = backoff_s
    for attempt in range(1, max(1, int(tries)) + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - server down, hiccup, timeout, 5xx, refused
            if attempt >= tries or not retry_if(exc):
                if warn is None:
                    raise
                warn(f"warning: MLflow {what} failed: {type(exc).__name__}: {exc}")
                return None
            time.sleep(delay)
            delay *= 2
    return None  # pragma: no cover


def permanent(exc: BaseException) -> bool:
    """An MLflow error that a retry cannot fix (bad request, missing resource), also as the cause of a
    :class:`TrackingError`."""
    code = getattr(exc, "error_code", None) or getattr(exc.__cause__, "error_code", None)
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST"}


#: what MLflow's REST client says when the server cannot be reached (after its own HTTP retries)
_UNREACHABLE_TEXT = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                     "Connection aborted", "Connection reset", "RemoteDisconnected", "timed out")


def unreachable(exc: BaseException) -> bool:
    """The server did not answer (down, restarting, unreachable), as opposed to refusing a request."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        try:
            import requests

            if isinstance(e, (requests.ConnectionError, requests.Timeout)):
                return True
        except ImportError:  # pragma: no cover
            pass
        e = e.__cause__ or e.__context__
    text = str(exc)
    return any(t in text for t in _UNREACHABLE_TEXT)


def reachable(tracking_uri: str, timeout_s: float = 2.0) -> bool:
    """A cheap probe: does the MLflow server answer its ``/health``? (non-HTTP stores: always)"""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s) as r:  # noqa: S310
            return r.status == 200
    except Exception:  # noqa: BLE001 - refused, timeout, 5xx
        return False


def flatten_params(config: dict[str, Any] | None, prefix: str = "", sep: str = ".",
                   depth: int | None = None) -> dict[str, str]:
    """Flat ``{key: str}`` for MLflow params: nested dicts joined with ``sep`` (``depth`` levels deep,
    all when None; a dict below that is JSON), lists/tuples as JSON, other values ``str``; a value
    longer than MLflow's :data:`MAX_PARAM_LEN` is cut to it, ending in ``...``."""
    out: dict[str, str] = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and (depth is None or depth > 1):
            out.update(flatten_params(v, key, sep, None if depth is None else depth - 1))
            continue
        if isinstance(v, (list, tuple)):
            try:
                s = json.dumps(list(v))
            except TypeError:
                s = str(list(v))
        elif isinstance(v, dict):
            s = json.dumps(v)
        elif isinstance(v, float):
            s = repr(v)
        else:
            s = str(v)
        out[key] = s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."
    return out


def short_error(exc: BaseException, n: int = 300) -> str:
    """``Type: message``, first line only, at most ``n`` characters (for TrackingError texts)."""
    text = f"{exc.__class__.__name__}: {exc}".strip()
    text = text.splitlines()[0] if text else text
    return text if len(text) <= n else text[: n - 3] + "..."
