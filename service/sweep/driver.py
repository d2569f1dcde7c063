"""The study driver: one process per study, run on the Ray cluster as a Ray Job.

Entry point: ``python -m service.sweep.driver`` with the job payload in the environment variable
``BONN_SWEEP_JOB`` (JSON), or ``python -m service.sweep.driver --job-file payload.json`` for local
debugging (then ``RAY_ADDRESS`` names the cluster). Payload::

    {"study_id", "spec": StudySpec dict (search_space inline), "mlflow_tracking_uri", "experiment_id",
     "parent_run_id", "optuna_storage": SQLAlchemy URL, "tune_storage": path/URI,
     "resume": bool, "num_trials": int}

What it does, in the steps of :meth:`StudyDriver._run` (the modules of this package):

1. parses the payload once (``service.core.payload.JobPayload``), marks the parent run running
   (``service.core.parent_run.ParentRun``), connects to Ray;
2. decides how many trials this run may create, builds the search -- the Optuna searcher behind a
   concurrency limiter (``searcher``), the scheduler, the MLflow callback (``mlflow_callback``,
   ``outbox``) and the progress monitor (``monitor``) -- and the Tuner, fresh or restored with those
   objects rebuilt from the payload, so ``num_trials`` may grow on resume (``tuner``);
3. runs it; the monitor prints one line per trial event (visible in the Ray dashboard's job logs);
4. with a ``confirm`` section, trains the search's top configurations and the paper's point again over
   fresh seeds (``confirm``; a resume after the search goes straight on with it);
5. at the end registers the best trial's checkpoint (``objective.selection``) -- with ``confirm``, the
   confirmed best run's, with its test accuracy -- in the MLflow Model Registry as
   ``bonn-sweep-<study name>`` (``registry``), tags and ends the parent run.

Exit codes (``service.core.jobs`` EXIT_*): 0 succeeded; 1 failed (more than ``max_failed_trials`` trials errored, no trial completed,
an exception, model registration failed); 2 bad payload; 130 cancelled (SIGINT -- ``ray job stop``
with ``RAY_JOB_STOP_SIGNAL=SIGINT``: Tune saves its state first, so the study can be resumed). Any
other end (SIGKILL, the OOM killer, a lost node) is no decision of the driver: the API reports the
study ``INTERRUPTED`` (``service.core.jobs.JobInfo.study_status``), and a resume continues it.

Semantics worth knowing:

* ``budget.time_budget_s`` stops *starting* trials once that much driver time has passed (running
  trials finish); the elapsed time is kept in the Tune state, so it spans resumes.
* ``budget.max_failed_trials``: when more trials than this error (after ``max_failures=2`` retries
  each) in one run of the driver, no new trials start; running ones finish; the study fails. A resume
  starts counting afresh (and re-runs the errored trials from their checkpoints).
* ASHA's rung statistics are not part of Tune's saved state: a restored study starts its rungs empty.
* After a driver was killed, the restored Tune state is the last one Tune saved (about every second:
  ``tuner.save_tune_state_often``; Ray's own default is every ~10 s): trials started after it are lost (Optuna FAIL and MLflow KILLED, both with
  ``stop_reason=cancelled``) and replaced; trials that finished after it are kept and not replaced
  (``service.sweep.searcher``); a trial the state still shows running continues from its last checkpoint there
  -- if it had in fact finished, that last stretch is trained again and its results are dropped
  (Optuna and MLflow keep the first ones).
* A trial that errors (after its retries) gets the Optuna user attr ``error`` (one line, e.g.
  ``TrainingDiverged: non-finite training loss in epoch 1: ...``) and the MLflow tags ``error_reason``
  and ``error``. A diverging configuration is retried like any error (deterministically diverging again).
* MLflow down: the MLflow callback queues everything and sends it when the server is back
  (``service.sweep.outbox``); the sweep does not wait for it, except at its end (up to 120 s; 15 s on a
  cancel).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.jobs import EXIT_BAD_PAYLOAD, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK
from service.core.mlflow_calls import MAX_TAG_LEN
from service.core.parent_run import ParentRun
from service.core.payload import PAYLOAD_ENV, JobPayload, PayloadError
from service.core.spec import DEFAULT_EPOCHS
from service.sweep.monitor import StudyMonitor, echo

logger = logging.getLogger("bonn_sweep.driver")

CANCEL_MLFLOW_WAIT_S = 15.0  # on a cancel, how long the MLflow callback waits for an unreachable server


def load_payload(argv: list[str] | None = None) -> JobPayload:
    """The job payload from ``--job-file`` or ``$BONN_SWEEP_JOB`` (raises PayloadError / OSError)."""
    ap = argparse.ArgumentParser(prog="python -m service.sweep.driver", description="bonn-sweep study driver")
    ap.add_argument("--job-file", help="read the job payload from this JSON file instead of $" + PAYLOAD_ENV)
    ap.add_argument("study_id", nargs="?", help="optional; must match the payload's study_id")
    args = ap.parse_args(argv)
    if args.job_file:
        text = Path(args.job_file).read_text()
    else:
        text = os.environ.get(PAYLOAD_ENV, "")
        if not text:
            raise PayloadError(f"no job payload: set ${PAYLOAD_ENV} or pass --job-file")
    p = JobPayload.from_json(text)
    if args.study_id and args.study_id != p.study_id:
        raise PayloadError(f"study id {args.study_id!r} != payload study_id {p.study_id!r}")
    return p


@dataclass
class Search:
    """The pieces of one run of the study that Tune drives, wired to each other."""

    searcher: Any  # service.sweep.searcher.StudyOptunaSearch
    generator: Any  # StudySearchGenerator(StudyConcurrencyLimiter(searcher))
    scheduler: Any  # ASHA | FIFO
    tracker: Any  # service.sweep.mlflow_callback.MLflowStudyCallback
    monitor: StudyMonitor
    analysis: Any = None  # service.sweep.analysis.AnalysisCallback (stateless: appended last)

    @property
    def callbacks(self) -> list:
        # order matters: callback states are restored by position
        return [self.tracker, self.monitor] + ([self.analysis] if self.analysis is not None else [])


class StudyDriver:
    def __init__(self, payload: JobPayload):
        self.p = payload
        self.parent = ParentRun(payload.mlflow_tracking_uri, payload.parent_run_id, tries=3, warn=echo)
        self.cancel_requested = False
        self.t_start = time.monotonic()
        self.tracker = None  # the MLflow callback, once built
        self.analysis = None  # service.sweep.analysis.StudyAnalysis, once built
        self.experiment_id: str | None = None  # the study's MLflow experiment, resolved once in _run

    @property
    def client(self):
        return self.parent.client

    def _experiment_id(self) -> str:
        p = self.p
        if p.experiment_id:
            return p.experiment_id
        if p.parent_run_id:
            return self.client.get_run(p.parent_run_id).info.experiment_id
        from service.sweep.registry import registered_model_name

        name = registered_model_name(p.study_spec.name)
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else self.client.create_experiment(name)

    # -- SIGINT: let Tune save its state -----------------------------------------------------------
    def _catch_cancel(self) -> None:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        signal.signal(signal.SIGINT, self._on_sigint)
        # SIGTERM (a stop without RAY_JOB_STOP_SIGNAL=SIGINT) is a cancel too, not a lost Tune state
        signal.signal(signal.SIGTERM, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.cancel_requested:
            raise KeyboardInterrupt  # a second signal: give up at once
        self.cancel_requested = True
        echo(f"cancel requested ({signal.Signals(signum).name}): stopping trials and saving the Tune state")
        if self.tracker is not None:  # an unreachable MLflow must not outlast RAY_JOB_STOP_WAIT_TIME_S
            self.tracker.final_wait_s = min(self.tracker.final_wait_s, CANCEL_MLFLOW_WAIT_S)
        # Tune's own SIGINT handler is disabled (TUNE_DISABLE_SIGINT_HANDLER=1) so that we know about
        # the cancel; inside Tuner.fit() Tune listens on SIGUSR1, which ends the run the same way.
        if callable(signal.getsignal(signal.SIGUSR1)):
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            raise KeyboardInterrupt

    # -- main --------------------------------------------------------------------------------------
    def run(self) -> int:
        p = self.p
        echo(f"study {p.study_id}: driver starting (resume={p.resume}, pid {os.getpid()})")
        try:
            p.trial_defaults  # noqa: B018 - validates the spec (once) and loads its search space
        except Exception as exc:  # noqa: BLE001 - pydantic ValidationError, unknown preset, ...
            echo(f"study {p.study_id} FAILED: invalid spec: {exc}")
            self.parent.end("FAILED", {"error": f"invalid spec: {exc}"[:MAX_TAG_LEN]})
            return EXIT_BAD_PAYLOAD
        try:
            return self._run()
        except KeyboardInterrupt:
            echo(f"study {p.study_id} cancelled")
            self.parent.end("CANCELLED")
            return EXIT_CANCELLED
        except Exception as exc:  # noqa: BLE001
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            echo(f"study {p.study_id} FAILED: {type(exc).__name__}: {exc}")
            self.parent.end("FAILED", {"error": f"{type(exc).__name__}: {exc}"[:MAX_TAG_LEN]})
            return EXIT_FAILED

    def _run(self) -> int:
        import optuna
        from ray import tune

        from service.sweep.tuner import build_tuner, connect_ray, join_uri, make_storage, save_tune_state_often

        p = self.p
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = make_storage(p.optuna_storage)
        experiment_id = self.experiment_id = self._experiment_id()
        self.parent.start(p.study_id)
        connect_ray(echo)
        self._catch_cancel()

        from service.sweep.confirm import search_finished

        exp_path = join_uri(p.tune_storage, p.study_id)
        study = _load_study_or_none(p.study_id, storage)
        if search_finished(p, study):
            echo(f"study {p.study_id}: the search has ended before; going on with the confirmation")
            return self._conclude(study, None)
        restoring = tune.Tuner.can_restore(exp_path)
        num_trials, grid = self._trials_to_run(study, restoring)
        save_tune_state_often()
        search = self._build_search(storage, experiment_id, exp_path, num_trials, grid)
        tuner = build_tuner(p, exp_path=exp_path, restoring=restoring, search_alg=search.generator,
                            scheduler=search.scheduler, callbacks=search.callbacks, num_trials=num_trials, echo=echo)
        self._echo_plan(num_trials)
        fit_error = self._fit(tuner, search)
        if self.cancel_requested:
            return self._cancelled(search.searcher.study, exp_path)
        if fit_error is not None:
            raise fit_error
        return self._conclude(search.searcher.study, search.monitor)

    # -- the steps of _run -------------------------------------------------------------------------
    def _trials_to_run(self, existing, restoring: bool) -> tuple[int, dict | None]:
        """``(trials this run may create, the grid of a grid sampler)``: the requested number, capped
        by the grid's size; without Tune state, less the trials of the ``existing`` Optuna study (None:
        none yet) that already finished (its RUNNING ones are orphans of a crashed driver: FAIL)."""
        import optuna

        from service.sweep.samplers import grid_size
        from service.sweep.searcher import fail_running_trials

        num_trials, grid = self.p.trials_requested, None
        if self.p.study_spec.sampler.type == "grid":
            grid = self.p.study_spec.space.grid()
            if num_trials > grid_size(grid):
                echo(f"grid has {grid_size(grid)} points: num_trials {num_trials} -> {grid_size(grid)}")
                num_trials = grid_size(grid)
        if restoring:
            return num_trials, grid
        if existing is not None:
            n = fail_running_trials(existing)
            done = len(existing.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.PRUNED)))
            if n:
                echo(f"marked {n} orphaned RUNNING Optuna trial(s) FAIL")
            if done:
                echo(f"Optuna study already has {done} finished trial(s) without Tune state: "
                     f"running the remaining {max(num_trials - done, 0)}")
                num_trials = max(num_trials - done, 0)
        if num_trials == 0:
            echo("nothing left to run")
        return num_trials, grid

    def _build_search(self, storage, experiment_id: str, exp_path: str, num_trials: int,
                      grid: dict | None) -> Search:
        from service.sweep.mlflow_callback import MLflowStudyCallback, spool_dir_for, upload_policy
        from service.sweep.searcher import (
            DefineByRun,
            StudyConcurrencyLimiter,
            StudyOptunaSearch,
            StudySearchGenerator,
        )
        from service.sweep.samplers import build_sampler
        from service.sweep.tuner import make_scheduler

        p, spec = self.p, self.p.study_spec
        metric, mode = spec.objective.metric, spec.objective.mode
        searcher = StudyOptunaSearch(
            DefineByRun(spec.space, drop_keys=p.trial_defaults.keys()),
            # a multi-objective study (objective.also): Optuna gets every objective, the rest the primary one
            metric=spec.objective.metrics if spec.objective.multi else metric,
            mode=spec.objective.modes if spec.objective.multi else mode,
            sampler=build_sampler(spec.sampler.type, spec.sampler.seed, grid),
            storage=storage,
            study_name=p.study_id,
            points_to_evaluate=list(getattr(spec.space, "warm_start_points", None) or []),
            # the searcher's params never hold base keys (dropped above): a trial's epochs are base's
            default_epochs=p.epochs,
            max_t=p.max_t,
            echo=echo,
            selection=spec.objective.selection,
        )
        if spec.objective.multi:  # the objectives' names, for plots and optuna-dashboard
            searcher.study.set_user_attr("objective_names", spec.objective.metrics)
            searcher.study.set_metric_names(spec.objective.metrics)
        limiter = StudyConcurrencyLimiter(searcher, max_concurrent=int(spec.budget.max_concurrent_trials))
        generator = StudySearchGenerator(limiter, num_trials=num_trials)
        tracker = MLflowStudyCallback(
            tracking_uri=p.mlflow_tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=p.parent_run_id,
            study_id=p.study_id,
            metric=metric,
            mode=mode,
            default_epochs=DEFAULT_EPOCHS,
            max_t=p.max_t,
            upload=upload_policy(spec),
            optuna_link=searcher,
            echo=echo,
            selection=spec.objective.selection,
            spool_dir=spool_dir_for(exp_path),
        )
        self.tracker = tracker
        monitor = StudyMonitor(
            metric=metric, num_trials=p.trials_requested, fixed_keys=p.trial_defaults.keys(),
            max_failed_trials=spec.budget.max_failed_trials, time_budget_s=spec.budget.time_budget_s,
            default_epochs=DEFAULT_EPOCHS, max_t=p.max_t, generator=generator, searcher=searcher,
        )
        searcher.error_reason = monitor.error_reason  # the Optuna trial's `error` attr
        from service.sweep.analysis import DEFAULT_EVERY, AnalysisCallback, StudyAnalysis

        self.analysis = StudyAnalysis(p.mlflow_tracking_uri, p.parent_run_id, target_name=metric, echo=echo,
                                      online=tracker.online)
        every = int(os.environ.get("BONN_SWEEP_ANALYSIS_EVERY") or DEFAULT_EVERY)
        return Search(searcher=searcher, generator=generator, scheduler=make_scheduler(p), tracker=tracker,
                      monitor=monitor, analysis=AnalysisCallback(self.analysis, lambda: searcher.study, every))

    def _echo_plan(self, num_trials: int) -> None:
        p, spec = self.p, self.p.study_spec
        sched, res = spec.scheduler, spec.resources
        echo(f"study {p.study_id} ({spec.name}): {num_trials} trials, {spec.budget.max_concurrent_trials} "
             f"concurrent, sampler={spec.sampler.type} scheduler={sched.type}"
             + (f"(grace={sched.grace_period}, rf={sched.reduction_factor:g}, max_t={p.max_t})"
                if sched.type == "asha" else "")
             + f", objective {spec.objective.metric} ({spec.objective.mode}), resources "
               f"cpu={res.cpus_per_trial:g} gpu={res.gpus_per_trial:g} x{res.data_parallel_workers}"
             + "".join(f" {k}={v:g}" for k, v in sorted(p.custom_resources.items())))

    def _fit(self, tuner, search: Search) -> BaseException | None:
        """Run the tuning loop; a cancel ends it with the Tune state saved. Returns its error, if any."""
        t_fit = time.monotonic()
        fit_error: BaseException | None = None
        try:
            tuner.fit()
        except KeyboardInterrupt:
            self.cancel_requested = True
        except Exception as exc:  # noqa: BLE001
            fit_error = exc
        fit_s = time.monotonic() - t_fit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

        timing = search.monitor.timing_summary()
        echo(f"tuning loop ended after {fit_s:.1f}s: Optuna trials {_state_counts(search.searcher.study)}; "
             + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in timing.items()))
        tracker = search.tracker
        if tracker.timings:
            echo("MLflow callback time: " + ", ".join(
                f"{k} {n}x {sec:.2f}s" for k, (n, sec) in sorted(tracker.timings.items()))
                + (f"; {tracker.failed_calls} MLflow call(s) failed" if tracker.failed_calls else ""))
        return fit_error

    def _cancelled(self, study, exp_path: str) -> int:
        from service.sweep.searcher import mark_running_trials
        from service.sweep.stop_reasons import STOP_CANCELLED

        n = mark_running_trials(study, STOP_CANCELLED)
        echo(f"study {self.p.study_id} cancelled: Tune state saved in {exp_path}; {n} unfinished trial(s) "
             "will continue on resume")
        self.parent.end("CANCELLED")
        return EXIT_CANCELLED

    def _conclude(self, study, monitor: StudyMonitor | None) -> int:
        """The search ran to its end (``monitor``: None when an earlier run of the driver ended it):
        failed (failure limit, no trial completed) or succeeded -- then the confirmation stage runs (with
        ``confirm``), the best trial is tagged on the parent run and its (confirmed) model registered."""
        from service.sweep import confirm
        from service.sweep.registry import register_best
        from service.sweep.searcher import fail_running_trials

        p, metric = self.p, self.p.study_spec.objective.metric
        if self.analysis is not None:
            self.analysis.log(study, final=True)  # the study's plots, final
        orphans = fail_running_trials(study)  # hygiene: nothing can continue these any more
        if orphans:
            echo(f"marked {orphans} leftover RUNNING Optuna trial(s) FAIL")
        counts = _state_counts(study)

        if monitor is not None and monitor.failure_limit_hit:
            msg = (f"{monitor.failed} trials failed "
                   f"(max_failed_trials={p.study_spec.budget.max_failed_trials})")
            return self._failed(msg, {"error": msg, "trial_counts": json.dumps(counts)})
        try:
            best = study.best_trial
        except ValueError:
            best = None
        except RuntimeError:  # multi-objective: the Pareto front; its best by the primary objective
            best = _primary_best(study, p.study_spec.objective.mode)
        if best is None:
            return self._failed("no trial completed", {"error": "no trial completed",
                                                       "trial_counts": json.dumps(counts)}, f" ({counts})")

        chosen, extra = best, None
        if p.study_spec.confirm is not None:
            summary = confirm.run_confirmation(self, study, echo)
            if self.cancel_requested:
                return self._cancelled(study, confirm.experiment_name(p.study_id))
            chosen = confirm.registered_run(summary, study) if summary else None
            if chosen is None:
                return self._failed("no confirmation run completed", {"error": "no confirmation run completed"})
            confirm.log_to_parent(self, summary, echo)
            extra = {"stage": "confirm", "test_acc": chosen.user_attrs.get("test_acc"),
                     "seed": chosen.user_attrs.get("seed")}
        tags = {
            "best_trial": best.number,
            "best_tune_trial_id": best.user_attrs.get("tune_trial_id", ""),
            "best_run_id": best.user_attrs.get("mlflow_run_id", ""),
            "best_value": best.values[0],
            "best_epoch": best.user_attrs.get(
                "best_epoch" if p.study_spec.objective.selection == "best" else "epochs_done", ""),
            "best_checkpoint_uri": best.user_attrs.get("checkpoint_uri", ""),
            "trial_counts": json.dumps(counts),
        }
        if len(study.directions) > 1:
            tags["pareto_front"] = json.dumps([{"number": t.number, "values": t.values}
                                               for t in study.best_trials])[:MAX_TAG_LEN]
        self.parent.set_tags(tags)
        self.parent.log_metric("best_value", float(best.values[0]))
        echo(f"best trial #{best.number} ({tags['best_tune_trial_id']}): {metric}={best.values[0]:.4g} "
             f"run {tags['best_run_id']}")

        try:
            t_reg = time.monotonic()
            ref = register_best(p, self.client, study, chosen, echo, extra_tags=extra)
            echo(f"registered model {ref} in {time.monotonic() - t_reg:.1f}s")
        except Exception as exc:  # noqa: BLE001
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            msg = f"model registration failed: {type(exc).__name__}: {exc}"
            return self._failed(msg, {"error": msg[:MAX_TAG_LEN]}, " (resume retries the registration)")

        wall = time.monotonic() - self.t_start
        self.parent.end("SUCCEEDED", {"registered_model": ref, "driver_wall_s": f"{wall:.1f}"})
        echo(f"study {p.study_id} SUCCEEDED in {wall:.1f}s: {counts}; best #{best.number} "
             f"{metric}={best.values[0]:.4g}; model {ref}")
        return EXIT_OK

    def _failed(self, msg: str, tags: dict[str, Any], note: str = "") -> int:
        echo(f"study {self.p.study_id} FAILED: {msg}{note}")
        self.parent.end("FAILED", tags)
        return EXIT_FAILED


def _load_study_or_none(study_name: str, storage):
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def _primary_best(study, mode: str):
    """The Pareto-optimal trial that is best by the primary objective (None without a complete trial)."""
    front = study.best_trials
    if not front:
        return None
    pick = max if mode == "max" else min
    return pick(front, key=lambda t: t.values[0])


def _state_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bounded MLflow HTTP retries: a dead server must not stall the sweep for minutes per call
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in job logs
    try:
        payload = load_payload(argv)
    except (PayloadError, OSError) as exc:
        echo(f"bad job payload: {exc}")
        return EXIT_BAD_PAYLOAD
    return StudyDriver(payload).run()


if __name__ == "__main__":
    sys.exit(main())
