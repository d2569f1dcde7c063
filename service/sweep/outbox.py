"""The MLflow callback's outbox: every MLflow write of a trial, queued in order, sent when MLflow answers.

:class:`MlflowOutbox` is the half of ``service.sweep.mlflow_callback.MLflowStudyCallback`` that talks
to MLflow. MLflow outages never crash the sweep, hold it up only for the first call that fails
(MLflow's own HTTP retries), and lose nothing: when the server cannot be reached the outbox goes
*offline* -- runs to create, params, per-epoch metrics, tags, run ends and checkpoints (spooled to
``spool_dir``, since Tune deletes old checkpoints) queue up per trial, in order, and are sent once a
cheap ``/health`` probe (exponential backoff up to ``max_down_backoff_s``) finds the server back: at
the next Tune step or trial event, and at the end of the sweep (the callback waits up to
``final_wait_s``). The queue is part of the callback's saved state. A request the server refuses for
good (or after ``retries`` attempts of :func:`service.core.mlflow_calls.mlflow_call`) is logged and
skipped.

A trial's record (a dict, see ``MLflowStudyCallback._record``) holds its queue: ``params`` (not sent
yet), ``pending`` metrics ``[(key, value, step, ts)]`` and ``ops``, the run updates in order
(``tags``, ``end``, ``reopen``, ``artifacts``). The study's parent-run metrics wait in ``_parent_ops``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from service.core.mlflow_calls import mlflow_call, permanent, reachable, unreachable
from service.core.parent_run import ParentRun

logger = logging.getLogger("bonn_sweep.tracking")

MAX_OP_TRIES = 5  # a queued run update that fails this often against a server that answers is dropped
DRAIN_INTERVAL_S = 1.0  # at most this often, a Tune step sends what other trials' events left queued


class MlflowOutbox:
    """Mixin: MLflow calls that never raise, the offline queue and its sending, checkpoint spooling.

    The class using it sets ``tracking_uri``, ``experiment_id``, ``parent_run_id``, ``study_id``,
    ``metric``, ``retries``, ``backoff_s``, ``echo``, ``spool_dir``, ``max_down_backoff_s``, ``upload``, ``_client``,
    ``_trials`` (trial id -> record), ``_parent_ops``, ``failed_calls`` and the offline bookkeeping of
    :meth:`_reset_online`; it provides ``_link(method, *args)`` (calls on the Optuna searcher) and
    ``_uploaded(rec, epoch)`` (a checkpoint reached MLflow).

    The first item a trial owes MLflow is its run (:meth:`_create_run`): the one tagged with its
    ``tune_trial_id`` if MLflow has it (a restore, a lost state), else a new child of the parent run.
    """

    tracking_uri: str
    parent_run_id: str | None
    _trials: dict[str, dict[str, Any]]
    _parent_ops: list[dict[str, Any]]

    def _link(self, method: str, *args) -> Any:  # pragma: no cover - provided by the callback
        raise NotImplementedError

    def _uploaded(self, rec: dict[str, Any], epoch: int) -> None:  # pragma: no cover - provided by the callback
        raise NotImplementedError

    def _reset_online(self) -> None:
        """This process has not seen MLflow fail (yet): no backoff, no pending probe."""
        self._down_until: float | None = None  # MLflow unreachable: no calls before this (monotonic)
        self._down_backoff = self.backoff_s
        self._down_since: float | None = None
        self._next_drain = 0.0

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def parent(self) -> ParentRun:
        """The study's parent run, written through this callback's client (and its outbox)."""
        return ParentRun(self.tracking_uri, self.parent_run_id, client=self.client)

    # -- MLflow calls that never raise -----------------------------------------------------------------
    def _call(self, what: str, fn: Callable, *args, **kwargs) -> tuple[bool, Any]:
        """``(True, result)`` or ``(False, None)``. A server that cannot be reached makes the callback
        *offline* (:meth:`online`): no call is tried until a probe finds it back, and what could not
        be sent stays queued. Other errors are retried with backoff, then logged and skipped."""
        if not self.online():
            return False, None
        try:
            return True, mlflow_call(what, fn, *args, tries=self.retries, backoff_s=self.backoff_s,
                                     retry_if=lambda exc: not unreachable(exc) and not permanent(exc), **kwargs)
        except Exception as exc:  # noqa: BLE001 - server down, hiccup, timeout, 5xx
            self.failed_calls += 1
            if unreachable(exc):
                self._go_offline(what, exc)
            else:
                logger.warning("MLflow %s failed: %s: %s", what, type(exc).__name__, exc)
            return False, None

    def _go_offline(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._down_backoff = self.backoff_s
            self._say(f"MLflow at {self.tracking_uri} unreachable ({what}: {type(exc).__name__}); "
                      "queueing runs, metrics, tags and checkpoints until it is back")
        else:
            self._down_backoff = min(self._down_backoff * 2, self.max_down_backoff_s)
        self._down_until = now + self._down_backoff

    def online(self) -> bool:
        """False while MLflow is unreachable; once the backoff has passed, a cheap probe decides."""
        if self._down_until is None:
            return True
        if time.monotonic() < self._down_until:
            return False
        if not reachable(self.tracking_uri):
            self._down_backoff = min(self._down_backoff * 2, self.max_down_backoff_s)
            self._down_until = time.monotonic() + self._down_backoff
            return False
        down_s = time.monotonic() - (self._down_since or time.monotonic())
        self._down_until = self._down_since = None
        self._say(f"MLflow reachable again after {down_s:.0f}s: sending {self.backlog()} queued item(s)")
        return True

    def _say(self, msg: str) -> None:
        if self.echo:
            self.echo(msg)
        else:
            logger.info(msg)

    @staticmethod
    def _owes(rec: dict[str, Any]) -> bool:
        """Something of this trial has not reached MLflow yet."""
        return rec["run_id"] is None or bool(rec.get("params") or rec["pending"] or rec.get("ops"))

    def backlog(self) -> int:
        """Items waiting for MLflow: unsent runs, metric values, run updates, parent metrics."""
        n = len(self._parent_ops)
        for rec in self._trials.values():
            n += int(rec["run_id"] is None) + int(bool(rec.get("params")))
            n += len(rec["pending"]) + len(rec.get("ops", []))
        return n

    def _find_existing_run(self, trial_id: str) -> tuple[bool, Any]:
        flt = f"tags.tune_trial_id = '{trial_id}' and tags.study_id = '{self.study_id}'"
        ok, runs = self._call(
            "search_runs", self.client.search_runs, experiment_ids=[self.experiment_id], filter_string=flt,
            max_results=5,
        )
        if ok and runs:
            return True, sorted(runs, key=lambda r: r.info.start_time or 0)[0]
        return ok, None

    def _create_run(self, rec: dict[str, Any]) -> bool:
        """The trial's run: one tagged with its id if MLflow has one, else a new one."""
        ok, existing = self._find_existing_run(rec["trial_id"])
        if not ok:
            return False
        if existing is not None:
            rec["run_id"] = existing.info.run_id
            rec["artifact_uri"] = existing.info.artifact_uri
            rec["reattached"] = True
            if rec["stop_reason"] is None and existing.info.status != "RUNNING":
                rec["ops"].insert(0, {"op": "reopen"})
            self._say(f"trial {rec['name']}: reusing MLflow run {rec['run_id']} (found by tune_trial_id)")
        else:
            tags = {
                "study_id": self.study_id,
                "tune_trial_id": rec["trial_id"],
                "mlflow.source.name": "bonn-sweep driver",
            }
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            if hasattr(self, "run_tags"):
                tags.update(self.run_tags(rec))
            number = self._link("trial_number", rec["trial_id"])
            if number is not None:
                tags["optuna_trial_number"] = str(number)
            ok, run = self._call(
                "create_run", self.client.create_run, experiment_id=self.experiment_id, tags=tags,
                run_name=rec["name"],
            )
            if not ok:
                return False
            rec["run_id"] = run.info.run_id
            rec["artifact_uri"] = run.info.artifact_uri
        attrs = {"mlflow_run_id": rec["run_id"]}
        selected = self.selected_epoch(rec) if hasattr(self, "selected_epoch") else rec["best_epoch"]
        if rec["checkpoint_uri"] is None and selected in rec["uploaded"]:
            rec["checkpoint_uri"] = self._checkpoint_uri(rec, selected)
            attrs["checkpoint_uri"] = rec["checkpoint_uri"]
        self._link("set_trial_attrs", rec["trial_id"], attrs)
        return True

    def _sync(self, rec: dict[str, Any]) -> bool:
        """Send what MLflow does not have of this trial yet, in order: the run, its params, metrics
        (never an epoch MLflow already has), then queued run updates. False when MLflow is unreachable
        (everything unsent stays queued); an item MLflow refuses for good is logged and dropped."""
        if not self.online():
            return False
        if rec["run_id"] is None and not self._create_run(rec):
            return False
        if rec["reattached"] and not self._sync_logged_step(rec):
            return False
        if rec.get("params"):
            if not self._log_params(rec) and not self.online():
                return False
            rec["params"] = None
        if rec["pending"]:
            if not self._flush(rec) and not self.online():
                return False
            rec["pending"] = []
        ops = rec.setdefault("ops", [])
        while ops:
            op = ops[0]
            if not self._apply_op(rec, op):
                op["tries"] = op.get("tries", 0) + 1
                if not self.online() and op["tries"] < MAX_OP_TRIES:
                    return False  # (a server that answers its probe but times out on this op: dropped)
                logger.warning("MLflow %s of %s dropped after %d attempt(s)", op["op"], rec["name"], op["tries"])
            ops.pop(0)
        return True

    def _sync_logged_step(self, rec: dict[str, Any]) -> bool:
        """After a restore (or a run found by tag): which epochs does MLflow have? Never log one twice."""
        ok, hist = self._call("get_metric_history", self.client.get_metric_history, rec["run_id"], self.metric)
        if not ok:
            return False
        rec["reattached"] = False
        have = max((int(m.step) for m in hist), default=0)
        if have:
            rec["pending"] = [m for m in rec["pending"] if m[2] > have]
            rec["logged_step"] = max(rec["logged_step"], have)
        return True

    def _log_params(self, rec: dict[str, Any]) -> bool:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(rec["params"].items())]
        ok = True
        for i in range(0, len(items), 100):
            ok &= self._call("log_batch(params)", self.client.log_batch, rec["run_id"], params=items[i : i + 100])[0]
        return ok

    def _flush(self, rec: dict[str, Any]) -> bool:
        """Pending metrics in batches of 1000 (MLflow's limit); a sent batch leaves the queue at once."""
        from mlflow.entities import Metric

        while rec["pending"]:
            chunk = rec["pending"][:1000]
            batch = [Metric(k, v, ts, step) for (k, v, step, ts) in chunk]
            if not self._call("log_batch(metrics)", self.client.log_batch, rec["run_id"], metrics=batch)[0]:
                return False
            del rec["pending"][: len(chunk)]
        return True

    def _apply_op(self, rec: dict[str, Any], op: dict[str, Any]) -> bool:
        run_id, kind = rec["run_id"], op["op"]
        if kind == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, str(v)) for k, v in op["tags"].items()]
            return self._call("log_batch(tags)", self.client.log_batch, run_id, tags=tags)[0]
        if kind == "end":
            return self._call("set_terminated", self.client.set_terminated, run_id, status=op["status"])[0]
        if kind == "reopen":  # a restored trial continues in its run: RUNNING again, stale stop_reason gone
            ok, run = self._call("get_run", self.client.get_run, run_id)
            if not ok:
                return False
            if run.info.status != "RUNNING" and not self._call("update_run", self.client.update_run, run_id,
                                                               status="RUNNING")[0]:
                return False
            if "stop_reason" in run.data.tags:
                return self._call("delete_tag", self.client.delete_tag, run_id, "stop_reason")[0]
            return True
        if kind == "artifacts":
            if not os.path.isdir(op["dir"]):
                logger.warning("spooled checkpoint %s of %s is gone; not uploaded", op["dir"], rec["name"])
                return True
            ok = self._upload_dir(run_id, op["dir"], op["path"], op.get("plots", []))
            if ok:
                shutil.rmtree(op["dir"], ignore_errors=True)
                if not op.get("plots_only"):
                    self._uploaded(rec, op["epoch"])
            return ok
        logger.warning("unknown queued MLflow operation %r dropped", kind)  # pragma: no cover
        return True

    def _queue(self, rec: dict[str, Any], op: dict[str, Any]) -> None:
        rec.setdefault("ops", []).append(op)

    def _drain(self) -> None:
        """Send whatever is queued (all trials, then the parent run) while MLflow answers."""
        for rec in self._trials.values():
            if self._owes(rec) and not self._sync(rec):
                return
        while self._parent_ops and self.parent_run_id:
            op = self._parent_ops[0]
            ok = self._call("log_metric(best_so_far)", self.parent.log_metric, op["key"], op["value"],
                            step=op["step"])[0]
            if not ok and not self.online():
                return
            self._parent_ops.pop(0)

    def _checkpoint_uri(self, rec: dict[str, Any], epoch: int) -> str:
        return f"{rec['artifact_uri'].rstrip('/')}/checkpoints/epoch_{epoch:03d}"

    def _spool(self, rec: dict[str, Any], epoch: int, files: list[str]) -> str:
        """Copies (hard links where possible) of a checkpoint's files, kept until MLflow takes them:
        Tune deletes all but its last checkpoints meanwhile."""
        if self.spool_dir is None:
            self.spool_dir = tempfile.mkdtemp(prefix="bonn-mlflow-spool-")
        d = os.path.join(self.spool_dir, rec["trial_id"], f"epoch_{epoch:03d}")
        os.makedirs(d, exist_ok=True)
        for f in files:
            _link_or_copy(f, os.path.join(d, os.path.basename(f)))
        return d

    def _upload(self, run_id: str, files: list[str], artifact_path: str) -> bool:
        if len(files) == 1:
            return self._call("log_artifact", self.client.log_artifact, run_id, files[0], artifact_path)[0]
        with tempfile.TemporaryDirectory(prefix="bonn-ckpt-") as tmp:
            for f in files:
                _link_or_copy(f, os.path.join(tmp, os.path.basename(f)))
            return self._call("log_artifacts", self.client.log_artifacts, run_id, tmp, artifact_path)[0]

    def _upload_dir(self, run_id: str, d: str, artifact_path: str, plots: list[str]) -> bool:
        files = sorted(os.path.join(d, f) for f in os.listdir(d))
        ok = self._upload(run_id, files, artifact_path)
        if ok and plots:
            self._upload(run_id, [os.path.join(d, p) for p in plots if os.path.exists(os.path.join(d, p))], "plots")
        return ok



def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


