"""MLflow tracking of a study: one child run per Tune trial under the study's parent run.

:class:`MLflowStudyCallback` is a Ray Tune callback that runs in the study driver. It talks to MLflow
only through :class:`mlflow.MlflowClient` with explicit run ids (never a global active run), so it
cannot leak into or be confused by anything else in the process.

Per trial (one MLflow run, tag ``mlflow.parentRunId`` = the study's parent run):

* run name = the Tune trial name; tags ``study_id``, ``tune_trial_id``, ``optuna_trial_number``;
* params = the trial's *resolved* config (``trainables.config.TrainConfig.from_dict(...).to_dict()``,
  so defaults the study never set are logged too), flattened, lists as JSON;
* metrics = every numeric per-epoch value the trial reports, ``step`` = epoch;
* checkpoints as artifacts in ``on_checkpoint``: ``checkpoints/epoch_{E:03d}/checkpoint.pt`` plus the
  epoch's ``weights_hist_epoch*.png`` (also copied to ``plots/``);
* at the end tag ``stop_reason`` = ``completed`` | ``early_stopped`` | ``error`` | ``cancelled`` and
  terminate the run ``FINISHED`` (completed, early_stopped) | ``FAILED`` | ``KILLED`` (cancelled).

Per study (the parent run): metric ``best_so_far`` after every finished trial (step = number of
finished trials; value = best objective of the trials that ran to completion).

Restore: the trial -> run map and per-trial bookkeeping live in :meth:`get_state` / :meth:`set_state`
(saved with Tune's experiment state), so a restored sweep reopens the same run. As a second guard,
before creating a run the callback searches the experiment for a run tagged with the trial's
``tune_trial_id`` and ``study_id``. A reopened run skips epochs it already has (a crash can make a
restored trial repeat epochs after its last saved experiment state).

MLflow outages never crash the sweep and lose nothing: what cannot be sent waits in the outbox
(:class:`service.sweep.outbox.MlflowOutbox`, part of the saved state) until MLflow is back. A trial
that starts and ends entirely within an outage gets its run afterwards, but its (finished) Optuna
trial cannot take the ``mlflow_run_id`` attribute any more: the run is found by its ``tune_trial_id`` tag.

Errors: an errored trial's run gets tags ``error`` (the end of Tune's error text, all attempts) and
``error_reason`` (one line, e.g. ``TrainingDiverged: non-finite training loss in epoch 1: ...``).
Runs left ``RUNNING`` by a killed driver whose trials the restored sweep does not know (started after
the last saved Tune state) are ended ``KILLED`` with ``stop_reason=cancelled`` at the first step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from typing import Any, Callable

from ray.tune import Callback

from service.core.mlflow_calls import MAX_TAG_LEN, flatten_params
from service.sweep.checkpoint_uploads import CheckpointUploads
from service.sweep.outbox import DRAIN_INTERVAL_S, MlflowOutbox
from service.sweep.stop_reasons import (
    RUN_STATUS_FOR_REASON,
    STOP_CANCELLED,
    STOP_COMPLETED,
    STOP_ERROR,
    classify_stop,
    epochs_done,
    error_reason,
    finite,
    target_epochs,
    trial_error_text,
)

logger = logging.getLogger("bonn_sweep.tracking")

#: Tune bookkeeping keys that are not metrics of the trial
NON_METRIC_KEYS = frozenset({
    "done", "timestamp", "pid", "trial_id", "date", "hostname", "node_ip", "config", "should_checkpoint",
    "checkpoint_dir_name", "experiment_tag", "iterations_since_restore", "time_since_restore",
    "timesteps_since_restore", "timesteps_total", "episodes_total", "experiment_id",
})
#: per-epoch metrics also kept as trial attributes (the API's trial view shows the last value)
DYNAMICS_ATTRS = ("flip_frac", "flip_frac_init", "bimodality")
UPLOAD_POLICIES = ("all", "improved", "best_and_last", "none")


def upload_policy(spec: Any) -> str:
    """The StudySpec's ``checkpoints.upload``; ``$BONN_SWEEP_CHECKPOINT_UPLOAD`` (older setups) overrides it."""
    return os.environ.get("BONN_SWEEP_CHECKPOINT_UPLOAD") or spec.checkpoints.upload


def spool_dir_for(exp_path: str) -> str | None:
    """Where checkpoints wait while MLflow is unreachable, inside the Tune experiment (a restored sweep
    finds them again); None on remote Tune storage (the outbox then spools to a temporary folder)."""
    return None if "://" in exp_path else os.path.join(exp_path, "mlflow-spool")


def resolved_config(config: dict[str, Any]) -> dict[str, Any]:
    """The trial config with every default filled in (what the trial really trains with)."""
    cfg = {k: v for k, v in (config or {}).items() if not str(k).startswith("__")}
    try:
        from trainables.config import TrainConfig

        return {**cfg, **TrainConfig.from_dict(cfg).to_dict()}
    except Exception as exc:  # noqa: BLE001 - an invalid config fails in the trial; log what we have
        logger.debug("could not resolve trial config defaults: %s", exc)
        return cfg


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in (result or {}).items():
        if k in NON_METRIC_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if math.isfinite(v):
            out[k] = v
    return out


def _timed(hook):
    """Accumulate the wall time spent in a hook (``MLflowStudyCallback.timings``)."""
    import functools

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            n, s = self.timings.get(hook.__name__, (0, 0.0))
            self.timings[hook.__name__] = (n + 1, s + time.perf_counter() - t0)

    return wrapper


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


class MLflowStudyCallback(CheckpointUploads, MlflowOutbox, Callback):
    """Ray Tune callback: MLflow child run per trial, checkpoints as artifacts, restorable state.

    Args:
        tracking_uri: MLflow tracking URI (``http://...`` server or ``sqlite:///...``).
        experiment_id: the study's MLflow experiment.
        parent_run_id: the study's parent run (created by the API).
        study_id: tagged on every run (dedupe key together with ``tune_trial_id``).
        metric, mode: the study objective (best epoch / best checkpoint / ``best_so_far``).
        default_epochs: ``epochs`` of a trial whose config has none (TrainConfig's default).
        max_t: ASHA's ``max_t``: a trial stopped at ``max_t`` epochs counts as completed.
        upload: ``all`` (every epoch's checkpoint), ``improved`` (epochs that improve the trial's
            best, the final epoch, and epochs with a plot), ``best_and_last`` (the run keeps only its
            best epoch's and its last epoch's checkpoints: a superseded best is deleted from the run,
            plot epochs upload their plots only, and a trial stopped early gets its last checkpoint at
            its end; the StudySpec's default, ``checkpoints.upload``), ``none``.
        optuna_link: object with ``set_trial_attrs(tune_trial_id, dict)`` and
            ``trial_number(tune_trial_id)`` (:class:`service.sweep.searcher.StudyOptunaSearch`).
        retries, backoff_s: per MLflow call that fails while the server answers (5xx, 429, ...).
        echo: a function for one-line progress messages (default: the module logger).
        spool_dir: where checkpoint files wait for an upload while MLflow is unreachable (default:
            a temporary folder). The study driver uses a folder of the Tune experiment, so that a
            restored sweep still finds them.
        final_wait_s: at the end of the sweep, how long to wait for an unreachable MLflow to come
            back and take what is still queued.
        max_down_backoff_s: longest pause between two probes of an unreachable MLflow server.
        selection: ``objective.selection``: ``best`` -- a trial's ``checkpoint_uri`` is its best epoch's
            checkpoint; ``last`` -- its last epoch's.
        stage: tagged ``bonn_sweep.stage`` on every run (``search``; ``confirm`` for confirmation runs).
        trial_tags: ``tune_trial_id -> dict`` of extra tags for a new run (not pickled).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str | None,
        study_id: str,
        metric: str,
        mode: str = "max",
        default_epochs: int = 10,
        max_t: int | None = None,
        upload: str = "all",
        optuna_link: Any = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        echo: Callable[[str], None] | None = None,
        spool_dir: str | None = None,
        final_wait_s: float = 120.0,
        max_down_backoff_s: float = 10.0,
        selection: str = "best",
        stage: str = "search",
        trial_tags: Callable[[str], dict[str, str]] | None = None,
    ):
        if upload not in UPLOAD_POLICIES:
            raise ValueError(f"upload must be one of {UPLOAD_POLICIES}, got {upload!r}")
        self.tracking_uri = tracking_uri
        self.experiment_id = str(experiment_id)
        self.parent_run_id = parent_run_id
        self.study_id = study_id
        self.metric = metric
        self.mode = mode
        self.default_epochs = int(default_epochs)
        self.max_t = int(max_t) if max_t else None
        self.upload = upload
        self.optuna_link = optuna_link
        self.retries = max(1, int(retries))
        self.backoff_s = backoff_s
        self.echo = echo
        self.spool_dir = spool_dir
        self.final_wait_s = float(final_wait_s)
        self.max_down_backoff_s = float(max_down_backoff_s)
        self.selection = selection
        self.stage = stage
        self.trial_tags = trial_tags
        self._client = None
        # -- state saved with Tune's experiment state --
        self._trials: dict[str, dict[str, Any]] = {}
        self._study: dict[str, Any] = {"finished": 0, "best_value": None, "best_trial": None}
        self._parent_ops: list[dict[str, Any]] = []  # best_so_far metrics not sent yet
        # -- this process only --
        self._reset_online()
        self._orphans_checked = False
        self.failed_calls = 0
        self.timings: dict[str, tuple[int, float]] = {}  # hook -> (calls, seconds)

    # -- pickling (Tune pickles its callbacks into tuner.pkl) -----------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"] = None
        state["optuna_link"] = None
        state["echo"] = None
        state["trial_tags"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_parent_ops", [])
        self.__dict__.setdefault("spool_dir", None)
        self.__dict__.setdefault("final_wait_s", 120.0)
        self.__dict__.setdefault("max_down_backoff_s", 10.0)
        self.__dict__.setdefault("selection", "best")
        self.__dict__.setdefault("stage", "search")
        self.__dict__.setdefault("trial_tags", None)
        self._reset_online()
        self._orphans_checked = False

    def run_tags(self, rec: dict[str, Any]) -> dict[str, str]:
        """Tags of a new run beyond the study's: the stage and ``trial_tags`` of the trial."""
        tags = {"bonn_sweep.stage": self.stage}
        if self.trial_tags is not None:
            try:
                tags.update({str(k): str(v) for k, v in (self.trial_tags(rec["trial_id"]) or {}).items()})
            except Exception as exc:  # noqa: BLE001
                logger.debug("trial_tags(%s) failed: %s", rec["trial_id"], exc)
        return tags

    def selected_epoch(self, rec: dict[str, Any]) -> int | None:
        """The epoch whose checkpoint is the trial's (``objective.selection``)."""
        return rec["best_epoch"] if self.selection == "best" else (rec["epochs_done"] or None)

    def _link(self, method: str, *args) -> Any:
        if self.optuna_link is None:
            return None
        try:
            return getattr(self.optuna_link, method)(*args)
        except Exception as exc:  # noqa: BLE001
            logger.debug("optuna link %s failed: %s", method, exc)
            return None

    # -- per-trial record ----------------------------------------------------------------------------
    def _record(self, trial) -> dict[str, Any]:
        rec = self._trials.get(trial.trial_id)
        if rec is None:
            config = dict(getattr(trial, "config", {}) or {})
            rec = {
                "run_id": None,
                "artifact_uri": None,
                "name": str(trial),
                "trial_id": trial.trial_id,
                "target": target_epochs(config.get("epochs"), self.default_epochs, self.max_t),
                "epochs_done": 0,
                "last_value": None,
                "best_value": None,
                "best_epoch": None,
                "checkpoint_uri": None,
                "uploaded": [],
                "params": flatten_params(resolved_config(config)),  # not logged yet (None once logged)
                "logged_step": 0,  # highest epoch queued or sent (MLflow's, after a reattach)
                "pending": [],  # [(key, value, step, ts)] not sent yet
                "ops": [],  # run updates not sent yet, in order (_apply_op)
                "open": False,
                "stop_reason": None,
                "reattached": False,
            }
            self._trials[trial.trial_id] = rec
        return rec

    def run_id(self, trial_id: str) -> str | None:
        rec = self._trials.get(trial_id)
        return rec["run_id"] if rec else None

    def record(self, trial_id: str) -> dict[str, Any] | None:
        rec = self._trials.get(trial_id)
        return copy.deepcopy(rec) if rec else None

    def _reopen(self, rec: dict[str, Any]) -> None:
        """A restored trial continues in its run: RUNNING again, stale stop_reason removed."""
        if rec["open"]:
            return
        if rec["run_id"] is not None or rec["stop_reason"] is not None:
            self._queue(rec, {"op": "reopen"})
        rec["open"] = True
        rec["stop_reason"] = None

    # -- Tune hooks ----------------------------------------------------------------------------------
    def on_step_begin(self, iteration: int, trials: list, **info):
        if not self._orphans_checked:
            self._orphans_checked = self._end_orphan_runs(trials)
        now = time.monotonic()
        if now >= self._next_drain and (self._parent_ops or any(self._owes(r) for r in self._trials.values())):
            self._next_drain = now + DRAIN_INTERVAL_S
            self._drain()

    def _end_orphan_runs(self, trials: list) -> bool:
        """Runs of this study still RUNNING that no trial of the (restored) sweep will continue: their
        trials were started after the last saved Tune state by a driver that was then killed. They end
        ``KILLED`` with ``stop_reason=cancelled``, like their Optuna trials (searcher, restore)."""
        if not self.parent_run_id:
            return True
        known = {t.trial_id for t in trials} | set(self._trials)
        flt = (f"tags.study_id = '{self.study_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
               "and attributes.status = 'RUNNING'")
        ok, runs = self._call("search_runs(orphans)", self.client.search_runs, experiment_ids=[self.experiment_id],
                              filter_string=flt, max_results=1000)
        if not ok:
            return False
        for run in runs:
            tid = run.data.tags.get("tune_trial_id")
            if run.data.tags.get("bonn_sweep.stage", "search") != self.stage:
                continue  # the other stage's runs (search vs confirmation) are not this sweep's
            if not tid or tid in known:
                continue
            self._say(f"MLflow run {run.info.run_id} of trial {tid}: the trial was lost with a killed driver "
                      "before Tune saved it; ending the run as cancelled")
            self._call("set_tag", self.client.set_tag, run.info.run_id, "stop_reason", STOP_CANCELLED)
            self._call("set_terminated", self.client.set_terminated, run.info.run_id,
                       status=RUN_STATUS_FOR_REASON[STOP_CANCELLED])
        return True

    @_timed
    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        rec = self._record(trial)
        self._reopen(rec)
        attrs = {"tune_trial_id": trial.trial_id, "stop_reason": None}
        self._sync(rec)
        if rec["run_id"]:
            attrs["mlflow_run_id"] = rec["run_id"]
        self._link("set_trial_attrs", trial.trial_id, attrs)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info):
        self.on_trial_start(iteration, trials, trial, **info)

    @_timed
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        rec = self._record(trial)
        epoch = epochs_done(result)
        value = finite(result.get(self.metric))
        if epoch > rec["logged_step"]:
            ts = int(time.time() * 1000)
            rec["pending"].extend((k, v, epoch, ts) for k, v in numeric_metrics(result).items())
            rec["logged_step"] = epoch
        self._sync(rec)
        rec["epochs_done"] = max(rec["epochs_done"], epoch)
        attrs: dict[str, Any] = {"epochs_done": rec["epochs_done"]}
        for key in DYNAMICS_ATTRS:  # the learning dynamics a user checks first (trainables.dynamics)
            v = finite(result.get(key))
            if v is not None:
                attrs[key] = v
        if value is not None:
            rec["last_value"] = value
            attrs["last_value"] = value
            if _better(value, rec["best_value"], self.mode):
                rec["best_value"], rec["best_epoch"] = value, epoch
                attrs.update(best_value=value, best_epoch=epoch)
        self._link("set_trial_attrs", trial.trial_id, attrs)

    @_timed
    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info):
        rec = self._record(trial)
        if self.upload == "none":
            return
        epoch = epochs_done(getattr(trial, "last_result", None)) or rec["epochs_done"]
        self._upload_checkpoint(trial, rec, checkpoint, epoch)

    @_timed
    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        rec = self._record(trial)
        epochs = max(rec["epochs_done"], epochs_done(getattr(trial, "last_result", None)))
        if epochs == 0 and rec["last_value"] is None:
            reason = STOP_CANCELLED  # removed before it reported anything
        else:
            reason = classify_stop(epochs, rec["target"])
        if self.upload == "best_and_last" and 0 < epochs < rec["target"] and epochs != rec["best_epoch"]:
            self._upload_last(trial, rec, epochs)
        self._finish(trial, rec, reason)

    @_timed
    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        rec = self._record(trial)
        err = trial_error_text(trial)
        if err:
            self._queue(rec, {"op": "tags", "tags": {"error": err[-MAX_TAG_LEN:],
                                                     "error_reason": error_reason(err)[:MAX_TAG_LEN]}})
        self._finish(trial, rec, STOP_ERROR)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        rec = self._record(trial)
        n = getattr(getattr(trial, "run_metadata", None), "num_failures", None)
        self._queue(rec, {"op": "tags", "tags": {"retries": str(n)}})
        self._sync(rec)

    @_timed
    def on_experiment_end(self, trials: list, **info):
        """Runs still open now were interrupted (cancel, stop of the whole experiment): ``cancelled``.
        Then everything still queued goes to MLflow, waiting up to ``final_wait_s`` for it."""
        for t in trials:
            rec = self._trials.get(t.trial_id)
            if rec is not None and rec["open"]:
                self._finish(t, rec, STOP_CANCELLED, count=False)
        deadline = time.monotonic() + self.final_wait_s
        self._drain()
        while self.backlog() and self._down_until is not None and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            self._drain()
        if self.backlog() and self._down_until is not None:
            self._say(f"warning: MLflow unreachable for {self.final_wait_s:.0f}s at the end of the sweep: "
                      f"{self.backlog()} item(s) not sent (kept in the Tune state; a resume sends them)")

    def _finish(self, trial, rec: dict[str, Any], reason: str, count: bool = True) -> None:
        rec["stop_reason"] = reason
        self._queue(rec, {"op": "tags", "tags": {"stop_reason": reason}})
        self._queue(rec, {"op": "end", "status": RUN_STATUS_FOR_REASON[reason]})
        rec["open"] = False
        self._sync(rec)
        if not count:
            return
        # the parent run's best_so_far: over trials that ran to completion (the Optuna COMPLETE ones)
        self._study["finished"] += 1
        value = rec["best_value"] if self.selection == "best" else rec["last_value"]
        if reason == STOP_COMPLETED and value is not None and _better(value, self._study["best_value"], self.mode):
            self._study["best_value"] = value
            self._study["best_trial"] = trial.trial_id
        if self.parent_run_id and self._study["best_value"] is not None:
            self._parent_ops.append({"key": "best_so_far", "value": self._study["best_value"],
                                     "step": self._study["finished"]})
            self._drain()

    # -- state ---------------------------------------------------------------------------------------
    def get_state(self) -> dict | None:
        return {"trials": copy.deepcopy(self._trials), "study": dict(self._study),
                "parent_ops": copy.deepcopy(self._parent_ops), "version": 2}

    def set_state(self, state: dict) -> None:
        self._trials = copy.deepcopy(state.get("trials", {}))
        self._study.update(state.get("study", {}))
        self._parent_ops = copy.deepcopy(state.get("parent_ops", []))
        for tid, rec in self._trials.items():
            rec.setdefault("trial_id", tid)
            rec.setdefault("ops", [])
            rec.setdefault("params", None)  # a version-1 state had logged them (or kept no config)
            rec.pop("params_logged", None)
            rec["reattached"] = rec["run_id"] is not None  # MLflow may have epochs logged after the save
            if rec.get("stop_reason") is None:
                # saved while running (Tune saves its state before on_experiment_end): the run may
                # have been ended as cancelled since; _reopen() checks MLflow when the trial restarts
                rec["open"] = False

    @property
    def study_summary(self) -> dict[str, Any]:
        return dict(self._study)

