"""Why a trial stopped: the ``stop_reason`` vocabulary shared by Optuna user attrs and MLflow tags.

``completed`` (ran its target epochs), ``early_stopped`` (a scheduler stopped it: Optuna ``PRUNED``),
``error`` (failed after its retries: Optuna ``FAIL``, MLflow ``FAILED``) and ``cancelled`` (cut off by a
cancel or a killed driver). Also: how many epochs a result says a trial has done, when it counts as
complete, and the one-line ``error`` reason of an errored trial. No Ray, Optuna or MLflow imports.
"""

from __future__ import annotations

import math
import os
from typing import Any

STOP_COMPLETED = "completed"
STOP_EARLY = "early_stopped"
STOP_ERROR = "error"
STOP_CANCELLED = "cancelled"
STOP_REASONS = (STOP_COMPLETED, STOP_EARLY, STOP_ERROR, STOP_CANCELLED)

#: MLflow run status of a trial's run per stop reason
RUN_STATUS_FOR_REASON = {
    STOP_COMPLETED: "FINISHED",
    STOP_EARLY: "FINISHED",
    STOP_ERROR: "FAILED",
    STOP_CANCELLED: "KILLED",
}


def epochs_done(result: dict | None) -> int:
    """Epochs a trial has finished according to its last result (``epoch``, else Tune's iteration)."""
    if not result:
        return 0
    for key in ("epoch", "training_iteration"):
        v = result.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return int(v)
    return 0


def target_epochs(config_epochs: Any, default_epochs: int, max_t: int | None) -> int:
    """Epochs after which a trial counts as complete: its ``epochs``, capped by ASHA's ``max_t``."""
    try:
        epochs = int(config_epochs) if config_epochs is not None else int(default_epochs)
    except (TypeError, ValueError):
        epochs = int(default_epochs)
    return min(epochs, int(max_t)) if max_t else epochs


def classify_stop(epochs: int, target: int, error: bool = False) -> str:
    """``error`` | ``completed`` (reached its target epochs) | ``early_stopped`` (a scheduler stopped it)."""
    if error:
        return STOP_ERROR
    return STOP_COMPLETED if epochs >= target else STOP_EARLY


def finite(v: Any) -> float | None:
    """``v`` as a float if it is a finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def error_reason(text: str, limit: int = 500) -> str:
    """One line that says why a trial failed: the last exception line of its error text (Tune's
    ``error.txt`` holds one traceback per failure), e.g. ``TrainingDiverged: non-finite training loss
    in epoch 1: ...`` (module paths dropped)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("File ", "Traceback", "Failure #", "^", "~")):
            continue
        head, sep, rest = ln.partition(":")
        if sep and head and " " not in head and (head[0].isalpha() or head[0] == "_"):
            ln = f"{head.rsplit('.', 1)[-1]}:{rest}"
        return ln if len(ln) <= limit else ln[: limit - 3] + "..."
    return ""


def trial_error_text(trial) -> str:
    """The error text of a Tune trial: its error file (all attempts), else its error message."""
    path = None
    try:
        path = trial.error_file
    except Exception:  # noqa: BLE001
        pass
    if path and os.path.exists(path):
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            pass
    return str(getattr(trial, "error_msg", "") or "")


def trial_error_reason(trial) -> str:
    """Why a Tune trial errored, in one line (:func:`error_reason` of its error file)."""
    return error_reason(trial_error_text(trial))
