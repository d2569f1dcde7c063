"""The study's MLflow parent run, and its one owner: :class:`ParentRun`.

The API creates it (with the spec as params and artifacts) and ends it when a study ends without
its driver having done so; the study driver marks it running, tags it (``status``, ``study_id``,
``best_*``, ``trial_counts``, ``registered_model``, ``error``, ...), logs ``best_value`` and ends it;
the driver's MLflow callback logs ``best_so_far`` to it. All of them go through this class, under the
retry policy of :func:`service.core.mlflow_calls.mlflow_call` (``tries``: 1 in the API, 3 in the driver).

``mlflow`` is imported lazily (the API's import cost is unchanged).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from service.core.mlflow_calls import MAX_TAG_LEN, TrackingError, flatten_params, mlflow_call, short_error

#: the MLflow run status a study's final status means
MLFLOW_STATUS_FOR_STUDY = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED",
                           "INTERRUPTED": "KILLED"}
#: tags that mark a run as a study's parent run
PARENT_TAGS = {"bonn_sweep": "1", "bonn_sweep.role": "study"}


class ParentRun:
    """One study's parent run (``run_id``; None: no parent run, every write is a no-op).

    Args:
        tracking_uri: the MLflow tracking URI.
        run_id: the parent run's id.
        client: an ``MlflowClient`` to share (default: one of its own, built on first use).
        tries, backoff_s: the retry policy per call (:func:`~service.core.mlflow_calls.mlflow_call`).
        warn: where a failed write is reported; then writes never raise. Without it a failure raises
            :class:`~service.core.mlflow_calls.TrackingError`.
    """

    def __init__(self, tracking_uri: str, run_id: str | None = None, *, client: Any = None, tries: int = 1,
                 backoff_s: float = 0.5, warn: Callable[[str], None] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id or None
        self._client = client
        self.tries = tries
        self.backoff_s = backoff_s
        self.warn = warn

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return mlflow_call(what, fn, *args, tries=self.tries, backoff_s=self.backoff_s, warn=self.warn, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MlflowException, requests errors
            raise TrackingError(f"MLflow run {self.run_id}: {short_error(exc)}") from exc

    # -- the API ----------------------------------------------------------------------------------
    def create(self, experiment_id: str, *, study_id: str, study_name: str, spec: dict[str, Any],
               resolved_space: dict) -> str:
        """Create the parent run: tags, the spec as params (``objective.metric``, ``base.epochs``, ...),
        ``study_spec.json`` and ``search_space.json``. Returns (and keeps) its id."""
        try:
            run = mlflow_call("create_run", self.client.create_run, experiment_id, run_name=study_name,
                              tags={"study_id": study_id, "study_name": study_name, **PARENT_TAGS}, tries=self.tries,
                              backoff_s=self.backoff_s)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            flat = dict(spec)
            if "search_space" in flat and not isinstance(flat["search_space"], str):
                flat["search_space"] = "inline"  # the space itself is the search_space.json artifact
            params = [Param(k, v) for k, v in flatten_params(flat, depth=2).items()]
            for i in range(0, len(params), 100):
                mlflow_call("log_batch(params)", self.client.log_batch, self.run_id, params=params[i: i + 100],
                            tries=self.tries, backoff_s=self.backoff_s)
            for name, obj in (("study_spec.json", spec), ("search_space.json", resolved_space)):
                mlflow_call("log_text", self.client.log_text, self.run_id, json.dumps(obj, indent=2, sort_keys=True),
                            name, tries=self.tries, backoff_s=self.backoff_s)
            return self.run_id
        except Exception as exc:  # noqa: BLE001
            raise TrackingError(f"MLflow parent run: {short_error(exc)}") from exc

    def set_status(self, status: str) -> None:
        """``RUNNING`` (a resume) if the run is not running; a final MLflow status (FINISHED / FAILED /
        KILLED) only if the run is not final yet (the driver may have ended it already)."""
        if not self.run_id:
            return
        run = self._call("get_run", self.client.get_run, self.run_id)
        if run is None:
            return
        if status == "RUNNING":
            if run.info.status != "RUNNING":
                self._call("update_run", self.client.update_run, self.run_id, status="RUNNING")
        elif run.info.status == "RUNNING":
            self._call("set_terminated", self.client.set_terminated, self.run_id, status=status)

    # -- the driver -------------------------------------------------------------------------------
    def experiment_id(self) -> str | None:
        """The experiment the parent run belongs to (None without a run)."""
        if not self.run_id:
            return None
        run = self._call("get_run", self.client.get_run, self.run_id)
        return run.info.experiment_id if run is not None else None

    def start(self, study_id: str) -> None:
        """The driver runs the study: the run is RUNNING, tagged ``status=RUNNING`` and ``study_id``."""
        if not self.run_id:
            return
        self._call("update_run(parent)", self.client.update_run, self.run_id, status="RUNNING")
        self.set_tags({"status": "RUNNING", "study_id": study_id})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """All of ``tags`` in one request (``log_batch``), each value cut to MLflow's tag limit."""
        if not self.run_id or not tags:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        self._call(f"set_tags({', '.join(tags)})", self.client.log_batch, self.run_id, tags=batch)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        if not self.run_id:
            return
        self._call(f"log_metric({key})", self.client.log_metric, self.run_id, key, value, step=step)

    def end(self, study_status: str, tags: dict[str, Any] | None = None) -> None:
        """The study ended with ``study_status`` (SUCCEEDED / FAILED / CANCELLED): tag ``status`` (after
        ``tags``) and terminate the run with the MLflow status that means."""
        if not self.run_id:
            return
        self.set_tags({**(tags or {}), "status": study_status})
        self._call("set_terminated(parent)", self.client.set_terminated, self.run_id,
                   status=MLFLOW_STATUS_FOR_STUDY[study_status])
