"""Checkpoint retention in MLflow (StudySpec ``checkpoints.upload``): which epochs' checkpoints a trial's run
gets, and the deletion of a superseded best under ``best_and_last``. A mixin of
:class:`service.sweep.mlflow_callback.MLflowStudyCallback`; it sends through the outbox
(:class:`service.sweep.outbox.MlflowOutbox`: ``_sync``, ``_upload``, ``_queue``, ``_spool``) and never
raises into the sweep.

Policies: ``best_and_last`` (default) -- a run holds its best epoch's and its last epoch's checkpoint, plot
epochs upload only their PNGs to ``plots/``; ``improved`` -- every improving epoch, the final one and plot
epochs; ``all`` -- every epoch; ``none``.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

logger = logging.getLogger("bonn_sweep.tracking")

CHECKPOINT_FILES = ("checkpoint.pt",)
PLOT_GLOB = "*.png"


class CheckpointUploads:
    """The ``checkpoints.upload`` chapter of the MLflow callback (a mixin: the callback holds the state)."""

    def _upload_checkpoint(self, trial, rec: dict[str, Any], checkpoint, epoch: int, last: bool = False) -> None:
        is_best = epoch == rec["best_epoch"]
        path = f"checkpoints/epoch_{epoch:03d}"
        keep = is_best or last or epoch >= rec["target"]
        try:
            with checkpoint.as_directory() as d:
                plots = sorted(glob.glob(os.path.join(d, PLOT_GLOB)))
                if self.upload in ("improved", "best_and_last") and not (keep or plots):
                    return
                if self.upload == "best_and_last" and not keep:  # a plot epoch: the plots, no checkpoint
                    self._upload_plots(rec, plots, epoch)
                    return
                files = [os.path.join(d, f) for f in CHECKPOINT_FILES if os.path.exists(os.path.join(d, f))]
                files += plots
                if not files:
                    return
                sent = False
                if self._sync(rec):
                    sent = self._upload(rec["run_id"], files, path)
                    if sent and plots:
                        self._upload(rec["run_id"], plots, "plots")
                    if not sent and self.online():
                        return  # refused by a reachable server: logged by _call, not retried
                if not sent:  # MLflow unreachable: keep the files until it is back
                    self._queue(rec, {"op": "artifacts", "dir": self._spool(rec, epoch, files), "path": path,
                                      "plots": [os.path.basename(p) for p in plots], "epoch": epoch})
        except Exception as exc:  # noqa: BLE001 - unreadable checkpoint: never crash the sweep
            logger.warning("checkpoint of %s not uploaded: %s", rec["name"], exc)
            return
        if sent:
            self._uploaded(rec, epoch)
        elif epoch == self.selected_epoch(rec) and rec["artifact_uri"]:  # where it will be once MLflow has it
            rec["checkpoint_uri"] = self._checkpoint_uri(rec, epoch)
            self._link("set_trial_attrs", trial.trial_id, {"checkpoint_uri": rec["checkpoint_uri"]})

    def _uploaded(self, rec: dict[str, Any], epoch: int) -> None:
        if epoch not in rec["uploaded"]:
            rec["uploaded"].append(epoch)
        if epoch == self.selected_epoch(rec) and rec["artifact_uri"]:
            rec["checkpoint_uri"] = self._checkpoint_uri(rec, epoch)
            self._link("set_trial_attrs", rec["trial_id"], {"checkpoint_uri": rec["checkpoint_uri"]})
        if self.upload == "best_and_last":
            self._prune_checkpoints(rec)

    def _upload_last(self, trial, rec: dict[str, Any], epoch: int) -> None:
        """A trial that ended before its target epochs (ASHA): its last checkpoint (Tune's latest)."""
        rec["last_epoch"] = epoch
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is not None:
            self._upload_checkpoint(trial, rec, checkpoint, epoch, last=True)

    def _upload_plots(self, rec: dict[str, Any], plots: list[str], epoch: int) -> None:
        """A plot epoch under ``best_and_last``: its histogram PNGs go to ``plots/``, its checkpoint not."""
        if self._sync(rec) and self._upload(rec["run_id"], plots, "plots"):
            return
        if not self.online():
            self._queue(rec, {"op": "artifacts", "dir": self._spool(rec, epoch, plots), "path": "plots",
                              "plots": [], "epoch": epoch, "plots_only": True})

    def _prune_checkpoints(self, rec: dict[str, Any]) -> None:
        """``best_and_last``: delete the run's checkpoints other than its best epoch's and its last
        epoch's (the final one, or where an early-stopped trial ended). A failed delete is retried at
        the next upload; the files then simply stay."""
        keep = {rec["best_epoch"], rec.get("last_epoch")} | {e for e in rec["uploaded"] if e >= rec["target"]}
        stale = [e for e in rec["uploaded"] if e not in keep]
        if not stale or not rec["artifact_uri"]:
            return
        try:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            repo = get_artifact_repository(rec["artifact_uri"], tracking_uri=self.tracking_uri)
        except Exception as exc:  # noqa: BLE001 - an artifact store without deletes: keep the files
            logger.warning("cannot delete superseded checkpoints of %s: %s", rec["name"], exc)
            return
        for e in stale:
            if self._call("delete_artifacts", repo.delete_artifacts, f"checkpoints/epoch_{e:03d}")[0]:
                rec["uploaded"].remove(e)
