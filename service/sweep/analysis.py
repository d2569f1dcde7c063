"""What the sweep learned, logged while it runs: the study's plots and fANOVA importances on the parent run.

:class:`StudyAnalysis` draws the study (``service.core.study_plots.render``: Optuna's plots as PNGs and
one interactive ``study.html``) and logs it to the study's MLflow parent run under ``analysis/``
(``<plot>.png``, ``study.html``, ``importances.json``), and the fANOVA importances as metrics
``importance.<param>`` (step = the number of finished trials). The driver refreshes them every
``every`` finished trials while the study runs (:class:`AnalysisCallback`, a stateless Tune callback;
``$BONN_SWEEP_ANALYSIS_EVERY``, default 4) and once more at its end. Nothing here ever fails the sweep.

MLflow down: a refresh asks ``online`` first (the MLflow callback's offline state,
``service.sweep.outbox``: no call while its backoff runs, then a cheap probe) and is skipped at once
when MLflow is unreachable -- the next refresh, or the final one, draws the whole study again, so
nothing is queued; the uploads go through the project's one retry policy (``mlflow_call``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Callable

from ray.tune import Callback

from service.core.mlflow_calls import mlflow_call, reachable
from service.core.study_plots import render

logger = logging.getLogger("bonn_sweep.analysis")

ARTIFACT_DIR = "analysis"
DEFAULT_EVERY = 4  # refresh the parent run's plots every this many finished trials


class StudyAnalysis:
    """Renders the study and logs it to the parent run (never raises)."""

    def __init__(self, tracking_uri: str, parent_run_id: str | None, target_name: str = "val_acc",
                 echo: Callable[[str], None] | None = None, online: Callable[[], bool] | None = None,
                 tries: int = 2):
        self.tracking_uri, self.parent_run_id, self.target_name = tracking_uri, parent_run_id, target_name
        self.echo = echo or logger.info
        self.online = online or (lambda: reachable(self.tracking_uri))
        self.tries = tries
        self.skipped = 0  # refreshes skipped while MLflow was unreachable

    def log(self, study, final: bool = False) -> dict[str, Any] | None:
        if not self.parent_run_id:
            return None
        try:
            if not self.online():
                self.skipped += 1
                self.echo(f"analysis {'(final) ' if final else ''}skipped: MLflow at {self.tracking_uri} is "
                          "unreachable (the next drawing covers the whole study)")
                return None
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            with tempfile.TemporaryDirectory(prefix="bonn-analysis-") as tmp:
                res = render(study, tmp, self.target_name)  # reads the study once (a snapshot)
                step = res["finished"]
                if not res["plots"] and not res["html"]:
                    return res
                client = MlflowClient(self.tracking_uri)
                mlflow_call("log analysis artifacts", client.log_artifacts, self.parent_run_id, tmp, ARTIFACT_DIR,
                            tries=self.tries)
                ts = int(time.time() * 1000)
                metrics = [Metric(f"importance.{k}", v, ts, step) for k, v in res["importances"].items()]
                if metrics:
                    mlflow_call("log importances", client.log_batch, self.parent_run_id, metrics=metrics,
                                tries=self.tries)
            self.echo(f"analysis {'(final) ' if final else ''}of {step} finished trial(s) logged to the parent "
                      f"run: {', '.join(res['plots'])}"
                      + (f"; importances {', '.join(f'{k}={v:.2f}' for k, v in res['importances'].items())}"
                         if res["importances"] else ""))
            return res
        except Exception as exc:  # noqa: BLE001 - plots never fail a sweep
            self.echo(f"warning: study analysis not logged: {type(exc).__name__}: {exc}")
            return None


class AnalysisCallback(Callback):
    """Tune callback: refresh the parent run's analysis every ``every`` finished trials. Stateless
    (``get_state`` is None), so adding it never disturbs a restored study's callback states."""

    def __init__(self, analysis: StudyAnalysis, study_fn: Callable[[], Any], every: int = DEFAULT_EVERY):
        self.analysis, self.study_fn, self.every = analysis, study_fn, max(1, int(every))
        self._finished = 0

    def _count(self) -> None:
        self._finished += 1
        if self._finished % self.every == 0:
            study = self.study_fn()
            if study is not None:
                self.analysis.log(study)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        self._count()

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._count()

    def __getstate__(self) -> dict:  # Tune pickles callbacks; the live ones are rebuilt on restore
        return {"analysis": None, "study_fn": None, "every": self.every, "_finished": 0}
