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

MLflow hiccups never crash the sweep: every call is retried with backoff, then logged and skipped;
metrics that could not be sent are kept and sent with the next batch.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from ray.tune import Callback

from service.optuna_bridge import (
    STOP_CANCELLED,
    STOP_COMPLETED,
    STOP_EARLY,
    STOP_ERROR,
    classify_stop,
    epochs_done,
    finite,
    target_epochs,
)

logger = logging.getLogger("bonn_sweep.tracking")

RUN_STATUS_FOR_REASON = {
    STOP_COMPLETED: "FINISHED",
    STOP_EARLY: "FINISHED",
    STOP_ERROR: "FAILED",
    STOP_CANCELLED: "KILLED",
}

#: Tune bookkeeping keys that are not metrics of the trial
NON_METRIC_KEYS = frozenset(
    {
        "done",
        "timestamp",
        "pid",
        "trial_id",
        "date",
        "hostname",
        "node_ip",
        "config",
        "should_checkpoint",
        "checkpoint_dir_name",
        "experiment_tag",
        "iterations_since_restore",
        "time_since_restore",
        "timesteps_since_restore",
        "timesteps_total",
        "episodes_total",
        "experiment_id",
    }
)
CHECKPOINT_FILES = ("checkpoint.pt",)
PLOT_GLOB = "*.png"
UPLOAD_POLICIES = ("all", "improved", "none")
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000


def flatten_config(config: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flat ``{key: str}`` for MLflow params: nested dicts joined with ``sep``, lists/tuples as JSON."""
    out: dict[str, str] = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_config(v, key, sep))
            continue
        if isinstance(v, (list, tuple)):
            try:
                s = json.dumps(list(v))
            except TypeError:
                s = str(list(v))
        elif isinstance(v, float):
            s = repr(v)
        else:
            s = str(v)
        out[key] = s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."
    return out


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


class MLflowStudyCallback(Callback):
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
            best, the final epoch, and epochs with a plot), ``none``.
        optuna_link: object with ``set_trial_attrs(tune_trial_id, dict)`` and
            ``trial_number(tune_trial_id)`` (:class:`service.optuna_bridge.StudyOptunaSearch`).
        retries, backoff_s: per MLflow call.
        echo: a function for one-line progress messages (default: the module logger).
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
        self._client = None
        # -- state saved with Tune's experiment state --
        self._trials: dict[str, dict[str, Any]] = {}
        self._study: dict[str, Any] = {"finished": 0, "best_value": None, "best_trial": None}
        self.failed_calls = 0
        self.timings: dict[str, tuple[int, float]] = {}  # hook -> (calls, seconds)

    # -- pickling (Tune pickles its callbacks into tuner.pkl) -----------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"] = None
        state["optuna_link"] = None
        state["echo"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- MLflow calls that never raise -----------------------------------------------------------------
    def _call(self, what: str, fn: Callable, *args, **kwargs) -> tuple[bool, Any]:
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return True, fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - server hiccup, timeout, 5xx
                if attempt == self.retries or _permanent(exc):
                    self.failed_calls += 1
                    logger.warning("MLflow %s failed after %d attempt(s): %s: %s", what, attempt,
                                   type(exc).__name__, exc)
                    return False, None
                time.sleep(delay)
                delay *= 2
        return False, None  # pragma: no cover

    def _say(self, msg: str) -> None:
        if self.echo:
            self.echo(msg)
        else:
            logger.info(msg)

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
                "target": target_epochs(config.get("epochs"), self.default_epochs, self.max_t),
                "epochs_done": 0,
                "last_value": None,
                "best_value": None,
                "best_epoch": None,
                "checkpoint_uri": None,
                "uploaded": [],
                "params_logged": False,
                "logged_step": 0,  # highest epoch whose metrics MLflow has
                "pending": [],  # [(key, value, step, ts)] not sent yet
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

    def _find_existing_run(self, trial_id: str):
        flt = f"tags.tune_trial_id = '{trial_id}' and tags.study_id = '{self.study_id}'"
        ok, runs = self._call(
            "search_runs", self.client.search_runs, experiment_ids=[self.experiment_id], filter_string=flt,
            max_results=5,
        )
        if ok and runs:
            return sorted(runs, key=lambda r: r.info.start_time or 0)[0]
        return None

    def _ensure_run(self, trial) -> dict[str, Any]:
        """The trial's run: the one in our state, else one tagged with its id, else a new one."""
        rec = self._record(trial)
        if rec["run_id"] is None:
            existing = self._find_existing_run(trial.trial_id)
            if existing is not None:
                rec["run_id"] = existing.info.run_id
                rec["artifact_uri"] = existing.info.artifact_uri
                rec["reattached"] = True
                rec["open"] = existing.info.status == "RUNNING"
                self._say(f"trial {rec['name']}: reusing MLflow run {rec['run_id']} (found by tune_trial_id)")
            else:
                tags = {
                    "study_id": self.study_id,
                    "tune_trial_id": trial.trial_id,
                    "mlflow.source.name": "bonn-sweep driver",
                }
                if self.parent_run_id:
                    tags["mlflow.parentRunId"] = self.parent_run_id
                number = self._link("trial_number", trial.trial_id)
                if number is not None:
                    tags["optuna_trial_number"] = str(number)
                ok, run = self._call(
                    "create_run", self.client.create_run, experiment_id=self.experiment_id, tags=tags,
                    run_name=rec["name"],
                )
                if not ok:
                    return rec  # retried on the next event
                rec["run_id"] = run.info.run_id
                rec["artifact_uri"] = run.info.artifact_uri
                rec["open"] = True
        if rec["reattached"]:
            self._sync_logged_step(rec)
        if not rec["params_logged"]:
            self._log_params(trial, rec)
        return rec

    def _sync_logged_step(self, rec: dict[str, Any]) -> None:
        """After a restore: which epochs does MLflow already have? (never log an epoch twice)"""
        rec["reattached"] = False
        ok, hist = self._call("get_metric_history", self.client.get_metric_history, rec["run_id"], self.metric)
        if ok and hist:
            rec["logged_step"] = max(rec["logged_step"], max(int(m.step) for m in hist))

    def _log_params(self, trial, rec: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = flatten_config(resolved_config(dict(getattr(trial, "config", {}) or {})))
        items = [Param(k, v) for k, v in sorted(params.items())]
        ok = True
        for i in range(0, len(items), 100):
            ok &= self._call("log_batch(params)", self.client.log_batch, rec["run_id"], params=items[i : i + 100])[0]
        rec["params_logged"] = ok

    def _reopen(self, rec: dict[str, Any]) -> None:
        """A restored trial continues in its run: RUNNING again, stale stop_reason removed."""
        if rec["run_id"] is None or rec["open"]:
            return
        ok, run = self._call("get_run", self.client.get_run, rec["run_id"])
        if not ok or run.info.status != "RUNNING":
            self._call("update_run", self.client.update_run, rec["run_id"], status="RUNNING")
        if ok and "stop_reason" in run.data.tags:
            self._call("delete_tag", self.client.delete_tag, rec["run_id"], "stop_reason")
        rec["open"] = True
        rec["stop_reason"] = None

    def _flush(self, rec: dict[str, Any]) -> None:
        if not rec["pending"] or rec["run_id"] is None:
            return
        from mlflow.entities import Metric

        batch = [Metric(k, v, ts, step) for (k, v, step, ts) in rec["pending"]]
        ok = True
        for i in range(0, len(batch), 1000):
            ok &= self._call("log_batch(metrics)", self.client.log_batch, rec["run_id"], metrics=batch[i : i + 1000])[0]
        if ok:
            rec["pending"] = []

    # -- Tune hooks ----------------------------------------------------------------------------------
    @_timed
    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        rec = self._ensure_run(trial)
        self._reopen(rec)
        attrs = {"tune_trial_id": trial.trial_id, "stop_reason": None}
        if rec["run_id"]:
            attrs["mlflow_run_id"] = rec["run_id"]
        self._link("set_trial_attrs", trial.trial_id, attrs)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info):
        self.on_trial_start(iteration, trials, trial, **info)

    @_timed
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        rec = self._ensure_run(trial)
        epoch = epochs_done(result)
        value = finite(result.get(self.metric))
        if epoch > rec["logged_step"]:
            ts = int(time.time() * 1000)
            rec["pending"].extend((k, v, epoch, ts) for k, v in numeric_metrics(result).items())
            rec["logged_step"] = epoch
            self._flush(rec)
        rec["epochs_done"] = max(rec["epochs_done"], epoch)
        attrs: dict[str, Any] = {"epochs_done": rec["epochs_done"]}
        if value is not None:
            rec["last_value"] = value
            attrs["last_value"] = value
            if _better(value, rec["best_value"], self.mode):
                rec["best_value"], rec["best_epoch"] = value, epoch
                attrs.update(best_value=value, best_epoch=epoch)
        self._link("set_trial_attrs", trial.trial_id, attrs)

    @_timed
    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info):
        rec = self._ensure_run(trial)
        if rec["run_id"] is None or self.upload == "none":
            return
        epoch = epochs_done(getattr(trial, "last_result", None)) or rec["epochs_done"]
        is_best = epoch == rec["best_epoch"]
        try:
            with checkpoint.as_directory() as d:
                plots = sorted(glob.glob(os.path.join(d, PLOT_GLOB)))
                if self.upload == "improved" and not (is_best or plots or epoch >= rec["target"]):
                    return
                path = f"checkpoints/epoch_{epoch:03d}"
                files = [os.path.join(d, f) for f in CHECKPOINT_FILES if os.path.exists(os.path.join(d, f))]
                files += plots
                if not files:
                    return
                ok = self._upload(rec["run_id"], files, path)
                if plots:
                    self._upload(rec["run_id"], plots, "plots")
        except Exception as exc:  # noqa: BLE001 - unreadable checkpoint: never crash the sweep
            logger.warning("checkpoint of %s not uploaded: %s", rec["name"], exc)
            return
        if ok:
            rec["uploaded"].append(epoch)
            if is_best and rec["artifact_uri"]:
                rec["checkpoint_uri"] = f"{rec['artifact_uri'].rstrip('/')}/{path}"
                self._link("set_trial_attrs", trial.trial_id, {"checkpoint_uri": rec["checkpoint_uri"]})

    def _upload(self, run_id: str, files: list[str], artifact_path: str) -> bool:
        if len(files) == 1:
            return self._call("log_artifact", self.client.log_artifact, run_id, files[0], artifact_path)[0]
        with tempfile.TemporaryDirectory(prefix="bonn-ckpt-") as tmp:
            for f in files:
                try:
                    os.link(f, os.path.join(tmp, os.path.basename(f)))
                except OSError:
                    shutil.copy2(f, os.path.join(tmp, os.path.basename(f)))
            return self._call("log_artifacts", self.client.log_artifacts, run_id, tmp, artifact_path)[0]

    @_timed
    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        rec = self._ensure_run(trial)
        epochs = max(rec["epochs_done"], epochs_done(getattr(trial, "last_result", None)))
        if epochs == 0 and rec["last_value"] is None:
            reason = STOP_CANCELLED  # removed before it reported anything
        else:
            reason = classify_stop(epochs, rec["target"])
        self._finish(trial, rec, reason)

    @_timed
    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        rec = self._ensure_run(trial)
        err = _error_text(trial)
        if err and rec["run_id"]:
            self._call("set_tag", self.client.set_tag, rec["run_id"], "error", err[-MAX_TAG_LEN:])
        self._finish(trial, rec, STOP_ERROR)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        rec = self._ensure_run(trial)
        if rec["run_id"]:
            n = getattr(getattr(trial, "run_metadata", None), "num_failures", None)
            self._call("set_tag", self.client.set_tag, rec["run_id"], "retries", str(n))

    @_timed
    def on_experiment_end(self, trials: list, **info):
        """Runs still open now were interrupted (cancel, stop of the whole experiment): ``cancelled``."""
        for t in trials:
            rec = self._trials.get(t.trial_id)
            if rec is not None and rec["open"]:
                self._finish(t, rec, STOP_CANCELLED, count=False)
        for rec in self._trials.values():
            self._flush(rec)

    def _finish(self, trial, rec: dict[str, Any], reason: str, count: bool = True) -> None:
        self._flush(rec)
        rec["stop_reason"] = reason
        if rec["run_id"] is not None:
            self._call("set_tag", self.client.set_tag, rec["run_id"], "stop_reason", reason)
            self._call(
                "set_terminated", self.client.set_terminated, rec["run_id"], status=RUN_STATUS_FOR_REASON[reason]
            )
        rec["open"] = False
        if not count:
            return
        # the parent run's best_so_far: over trials that ran to completion (the Optuna COMPLETE ones)
        self._study["finished"] += 1
        if reason == STOP_COMPLETED and rec["last_value"] is not None and _better(
            rec["last_value"], self._study["best_value"], self.mode
        ):
            self._study["best_value"] = rec["last_value"]
            self._study["best_trial"] = trial.trial_id
        if self.parent_run_id and self._study["best_value"] is not None:
            self._call(
                "log_metric(best_so_far)", self.client.log_metric, self.parent_run_id, "best_so_far",
                self._study["best_value"], step=self._study["finished"],
            )

    # -- state ---------------------------------------------------------------------------------------
    def get_state(self) -> dict | None:
        return {"trials": copy.deepcopy(self._trials), "study": dict(self._study), "version": 1}

    def set_state(self, state: dict) -> None:
        self._trials = copy.deepcopy(state.get("trials", {}))
        self._study.update(state.get("study", {}))
        for rec in self._trials.values():
            rec["reattached"] = True  # check MLflow for epochs logged after this state was saved
            if rec.get("stop_reason") is None:
                # saved while running (Tune saves its state before on_experiment_end): the run may
                # have been ended as cancelled since; _reopen() checks MLflow when the trial restarts
                rec["open"] = False

    @property
    def study_summary(self) -> dict[str, Any]:
        return dict(self._study)


def inference_model(model):
    """The model as the Model Registry serves it: ``forward(x) -> logits``.

    trainables' classifiers return ``(features, logits)`` (the feature loss needs the features); a
    registered model should answer with logits only, for ``mlflow.pytorch`` and ``mlflow.pyfunc`` alike.
    """
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            return out[-1] if isinstance(out, (tuple, list)) else out

    LogitsOnly.__qualname__ = LogitsOnly.__name__ = "BonnSweepLogitsOnly"
    return LogitsOnly(model).eval()


def _permanent(exc: Exception) -> bool:
    """An MLflow error that a retry cannot fix (bad request, missing resource)."""
    code = getattr(exc, "error_code", None)
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST"}


def _error_text(trial) -> str:
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
