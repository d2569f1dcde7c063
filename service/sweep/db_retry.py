"""Optuna's RDB storage riding out a database restart: every storage call retried on a lost connection.

:class:`RetryingRDBStorage` is an ``optuna.storages.RDBStorage`` whose public storage methods (those
of ``BaseStorage``) retry for up to ``BONN_SWEEP_DB_RETRY_S`` (default 180 s) when the database
connection is refused or dropped (SQLAlchemy ``OperationalError`` / ``InterfaceError``, also when
Optuna wraps them in ``StorageInternalError``), waiting 0.5 s, then longer, up to 5 s between tries.
The sweep then pauses while PostgreSQL restarts instead of failing the study
(tests/integration/test_db_restart.py). Other errors pass through at once. A write whose commit
reached the server just before the connection dropped could in principle be sent twice; Optuna's
writes either fail the second time (a finished trial is not updated again) or set the same value.
It pickles like ``RDBStorage`` (Tune saves the searcher with its storage).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage

log = logging.getLogger("service.sweep")


def is_connection_error(exc: BaseException) -> bool:
    """A refused or dropped database connection (retryable), not a bad query or a constraint."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, (OperationalError, InterfaceError)):
            return True
        if not isinstance(seen, optuna.exceptions.StorageInternalError):
            return False
        seen = seen.__cause__ or seen.__context__
    return False


def _retrying(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        window = float(os.environ.get("BONN_SWEEP_DB_RETRY_S", "180"))
        deadline = time.monotonic() + window
        pause = 0.5
        while True:
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                if not is_connection_error(exc) or time.monotonic() + pause > deadline:
                    raise
                log.warning("optuna storage: %s lost the database connection (%s); retrying in %.1fs",
                            fn.__name__, type(exc).__name__, pause)
                time.sleep(pause)
                pause = min(5.0, pause * 2)

    return call


class RetryingRDBStorage(RDBStorage):
    """``RDBStorage`` whose storage calls retry on a lost connection (see the module docstring)."""


for _name, _fn in inspect.getmembers(BaseStorage, inspect.isfunction):
    if not _name.startswith("_") and callable(getattr(RDBStorage, _name, None)):
        setattr(RetryingRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))
