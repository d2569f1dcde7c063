"""The study monitor: one progress line per trial event in the job log; the failure limit and time budget.

:class:`StudyMonitor` is a Ray Tune callback of the study driver. It prints (``echo``) a line when a
trial starts, reports an epoch, ends, errors or is restored -- the Ray dashboard's job log is the
study's live view -- and stops *new* trials (running ones finish) when more than
``max_failed_trials`` trials errored in this run of the driver or when ``time_budget_s`` of driver
time has passed (the elapsed time is saved with the Tune state, so it spans resumes).
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from service.sweep.stop_reasons import classify_stop, epochs_done, target_epochs, trial_error_reason
from service.sweep.tuner import TRIAL_MAX_FAILURES

NODE_ID_CHARS = 12  # node ids in the job log (enough to tell nodes apart)


def echo(msg: str) -> None:
    """One progress line on stdout (the Ray job log)."""
    print(f"[bonn-sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StudyMonitor(Callback):
    """Prints a line per trial event; stops new trials on the failure limit or the time budget.

    Args:
        metric: the study objective (shown with every result).
        num_trials: trials the study runs (``started (n of num_trials)``).
        fixed_keys: config keys every trial shares (not shown as its parameters).
        max_failed_trials: more errored trials than this stop new trials.
        time_budget_s: driver seconds after which no new trial starts (None: no limit).
        default_epochs, max_t: a trial's epochs when its config has none; ASHA's max_t (completion).
        generator: ``service.sweep.searcher.StudySearchGenerator`` (``set_finished()`` stops new trials).
        searcher: ``service.sweep.searcher.StudyOptunaSearch`` (Optuna trial numbers in the lines).
    """

    def __init__(self, *, metric: str, num_trials: int, fixed_keys: Any = (), max_failed_trials: int = 0,
                 time_budget_s: float | None = None, default_epochs: int = 10, max_t: int | None = None,
                 generator: Any = None, searcher: Any = None):
        self.metric = metric
        self.num_trials = int(num_trials)
        self.fixed_keys = frozenset(fixed_keys)
        self.max_failed_trials = int(max_failed_trials)
        self.time_budget_s = time_budget_s
        self.default_epochs = int(default_epochs)
        self.max_t = max_t
        self.generator = generator  # service.sweep.searcher.StudySearchGenerator
        self.searcher = searcher
        self.failed = 0
        self.failure_limit_hit = False
        self.budget_hit = False
        self.elapsed_before = 0.0
        self._t0 = time.monotonic()
        self.trial_start: dict[str, float] = {}
        self.trial_wall: dict[str, float] = {}
        self.trial_train: dict[str, float] = {}
        self.trial_first_result: dict[str, float] = {}
        self.ended: dict[str, str] = {}
        self.started: list[str] = []
        self._trials: list = []  # Tune's list of the experiment's trials (this process only)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["generator"] = state["searcher"] = None
        state["_trials"] = []
        return state

    def error_reason(self, trial_id: str) -> str | None:
        """Why trial ``trial_id`` errored, one line (from Tune's error file of the trial)."""
        for t in self._trials:
            if t.trial_id == trial_id:
                return trial_error_reason(t) or None
        return None

    def setup(self, **info):
        self._t0 = time.monotonic()

    # elapsed driver time across resumes (saved with the Tune state)
    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._t0)

    def get_state(self) -> dict | None:
        return {"elapsed_s": self.elapsed()}

    def set_state(self, state: dict) -> None:
        self.elapsed_before = float(state.get("elapsed_s", 0.0))

    def _stop_new_trials(self) -> None:
        if self.generator is not None:
            self.generator.set_finished()

    def _name(self, trial) -> str:
        num = self.searcher.trial_number(trial.trial_id) if self.searcher is not None else None
        return f"{trial}" + (f" (optuna #{num})" if num is not None else "")

    def on_step_begin(self, iteration: int, trials: list, **info):
        self._trials = trials
        b = self.time_budget_s
        if b and not self.budget_hit and self.elapsed() > b:
            self.budget_hit = True
            self._stop_new_trials()
            echo(f"time budget of {b:.0f}s reached: no new trials; running trials finish")

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        self.trial_start.setdefault(trial.trial_id, time.monotonic())
        keys = [k for k in trial.config if k not in self.fixed_keys]
        params = ", ".join(f"{k}={_fmt(trial.config[k])}" for k in sorted(keys))
        if trial.trial_id not in self.started:
            self.started.append(trial.trial_id)
        n = self.started.index(trial.trial_id) + 1
        echo(f"trial {self._name(trial)} started ({n} of {self.num_trials}): {params}")

    def on_trial_restore(self, iteration: int, trials: list, trial, **info):
        echo(f"trial {trial} restored from its checkpoint")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        self.trial_first_result.setdefault(trial.trial_id, time.monotonic())
        t = result.get("epoch_time_s")
        if isinstance(t, (int, float)):
            self.trial_train[trial.trial_id] = self.trial_train.get(trial.trial_id, 0.0) + float(t)
        m = self.metric
        epoch = result.get("epoch", result.get("training_iteration"))
        node = result.get("node_id")  # the Ray node the trial (its rank 0) runs on, from trainables.tune
        echo(f"trial {trial} epoch {epoch}/{trial.config.get('epochs', self.default_epochs)} "
             f"{m}={_fmt(result.get(m))} train_loss={_fmt(result.get('train_loss'))}"
             + (f" node={node[:NODE_ID_CHARS]}" if isinstance(node, str) and node else ""))

    def _ended(self, trial, what: str) -> None:
        t0 = self.trial_start.get(trial.trial_id)
        if t0 is not None:
            self.trial_wall[trial.trial_id] = time.monotonic() - t0
        self.ended[trial.trial_id] = what

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        last = trial.last_result or {}
        e = epochs_done(last)
        reason = classify_stop(e, target_epochs(trial.config.get("epochs"), self.default_epochs, self.max_t))
        self._ended(trial, reason)
        echo(f"trial {self._name(trial)} {reason} after {e} epoch(s): "
             f"{self.metric}={_fmt(last.get(self.metric))}{self._times(trial)}")

    def _times(self, trial) -> str:
        wall = self.trial_wall.get(trial.trial_id)
        if wall is None:
            return ""
        return f" (wall {wall:.1f}s, training {self.trial_train.get(trial.trial_id, 0.0):.1f}s)"

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        n = getattr(getattr(trial, "run_metadata", None), "num_failures", "?")
        echo(f"trial {trial} failed (failure {n}), retrying from its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._ended(trial, "error")
        self.failed += 1
        echo(f"trial {self._name(trial)} ERROR (after {TRIAL_MAX_FAILURES} retries){self._times(trial)}: "
             f"{trial_error_reason(trial) or '?'}; "
             f"{self.failed} failed trial(s), limit {self.max_failed_trials}")
        if self.failed > self.max_failed_trials and not self.failure_limit_hit:
            self.failure_limit_hit = True
            self._stop_new_trials()
            echo(f"more than {self.max_failed_trials} trials failed: no new trials; the study will fail")

    def timing_summary(self) -> dict[str, float]:
        walls = [self.trial_wall[t] for t in self.trial_wall]
        trains = [self.trial_train.get(t, 0.0) for t in self.trial_wall]
        starts = [self.trial_first_result[t] - self.trial_start[t] for t in self.trial_first_result
                  if t in self.trial_start]
        if not walls:
            return {}
        n = len(walls)
        return {
            "trials_timed": n,
            "trial_wall_mean_s": sum(walls) / n,
            "trial_train_mean_s": sum(trains) / n,
            "trial_overhead_mean_s": sum(w - t for w, t in zip(walls, trains)) / n,
            "first_result_latency_mean_s": (sum(starts) / len(starts)) if starts else float("nan"),
        }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
