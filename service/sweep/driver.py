"""The study driver: one process per study, run on the Ray cluster as a Ray Job.

Entry point: ``python -m service.sweep.driver`` with the job payload in the environment variable
``BONN_SWEEP_JOB`` (JSON), or ``python -m service.sweep.driver --job-file payload.json`` for local
debugging (then ``RAY_ADDRESS`` names the cluster). Payload::

    {"study_id", "spec": StudySpec dict (search_space inline), "mlflow_tracking_uri", "experiment_id",
     "parent_run_id", "optuna_storage": SQLAlchemy URL, "tune_storage": path/URI,
     "resume": bool, "num_trials": int}

What it does (design.md "Data flow" 2-4):

1. builds ``Tuner(with_resources(trainables.tune.train_bonn, cpu/gpu), TuneConfig(search_alg=
   Optuna (define-by-run space, sampler, RDBStorage, study_name=study_id) behind a concurrency
   limiter, scheduler=ASHA|FIFO, reuse_actors=True), RunConfig(storage_path=tune_storage,
   name=study_id, callbacks=[MLflowStudyCallback, StudyMonitor], FailureConfig(max_failures=2),
   CheckpointConfig(num_to_keep=2, by the objective)))`` -- or, when Tune state for the study exists,
   ``Tuner.restore(resume_errored=True)`` with the same searcher/scheduler/callback objects rebuilt
   from the payload (so ``num_trials`` may grow on resume);
2. runs it; prints one line per trial event (visible in the Ray dashboard's job logs);
3. at the end registers the best trial's best checkpoint in the MLflow Model Registry as
   ``bonn-sweep-<study name>``, tags and ends the parent run, sets the Optuna study user attr
   ``registered_model`` = ``"name/version"``.

Exit codes: 0 succeeded; 1 failed (more than ``max_failed_trials`` trials errored, no trial completed,
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
* After a driver was killed, the restored Tune state is the last one Tune saved (every ~10 s, and when
  trials checkpoint): trials started after it are lost (Optuna FAIL and MLflow KILLED, both with
  ``stop_reason=cancelled``) and replaced; trials that finished after it are kept and not replaced
  (``optuna_bridge``); a trial the state still shows running continues from its last checkpoint there
  -- if it had in fact finished, that last stretch is trained again and its results are dropped
  (Optuna and MLflow keep the first ones).
* A trial that errors (after its retries) gets the Optuna user attr ``error`` (one line, e.g.
  ``TrainingDiverged: non-finite training loss in epoch 1: ...``) and the MLflow tags ``error_reason``
  and ``error``. A diverging configuration is retried like any error (deterministically diverging again).
* MLflow down: the MLflow callback queues everything and sends it when the server is back
  (``service.sweep.tracking``); the sweep does not wait for it, except at its end (up to 120 s; 15 s on a
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("bonn_sweep.driver")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_PAYLOAD = 2
EXIT_CANCELLED = 130
PAYLOAD_ENV = "BONN_SWEEP_JOB"
DEFAULT_EPOCHS = 10
TRIAL_MAX_FAILURES = 2  # retries per trial (Tune FailureConfig.max_failures)
CHECKPOINTS_TO_KEEP = 2
CANCEL_MLFLOW_WAIT_S = 15.0  # on a cancel, how long the MLflow callback waits for an unreachable server
NODE_ID_CHARS = 12  # node ids in the job log (enough to tell nodes apart)


def echo(msg: str) -> None:
    """One progress line on stdout (the Ray job log)."""
    print(f"[bonn-sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- payload ---------------------------------------------------------------------------------------


class PayloadError(ValueError):
    pass


@dataclass
class Payload:
    study_id: str
    spec: dict[str, Any]
    mlflow_tracking_uri: str
    optuna_storage: str
    tune_storage: str
    experiment_id: str | None = None
    parent_run_id: str | None = None
    resume: bool = False
    num_trials: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Payload:
        if not isinstance(d, dict):
            raise PayloadError("payload must be a JSON object")
        missing = [k for k in ("study_id", "spec", "mlflow_tracking_uri", "optuna_storage", "tune_storage") if not d.get(k)]
        if missing:
            raise PayloadError(f"payload misses {', '.join(missing)}")
        if not isinstance(d["spec"], dict):
            raise PayloadError("payload.spec must be a StudySpec object")
        known = set(cls.__dataclass_fields__) - {"extra"}
        nt = d.get("num_trials")
        if nt is not None and (not isinstance(nt, int) or isinstance(nt, bool) or nt < 1):
            raise PayloadError(f"payload.num_trials must be a positive integer (got {nt!r})")
        return cls(
            study_id=str(d["study_id"]),
            spec=d["spec"],
            mlflow_tracking_uri=str(d["mlflow_tracking_uri"]),
            optuna_storage=str(d["optuna_storage"]),
            tune_storage=str(d["tune_storage"]),
            experiment_id=str(d["experiment_id"]) if d.get("experiment_id") not in (None, "") else None,
            parent_run_id=d.get("parent_run_id") or None,
            resume=bool(d.get("resume", False)),
            num_trials=nt,
            extra={k: v for k, v in d.items() if k not in known},
        )


def load_payload(argv: list[str] | None = None) -> Payload:
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
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"job payload is not JSON: {exc}") from exc
    p = Payload.from_dict(data)
    if args.study_id and args.study_id != p.study_id:
        raise PayloadError(f"study id {args.study_id!r} != payload study_id {p.study_id!r}")
    return p


# -- the spec, leniently (service.core.spec.StudySpec is the validator) ---------------------------------


@dataclass
class StudyPlan:
    """Everything the driver needs from a StudySpec, resolved."""

    name: str
    space: Any  # search_spaces.SearchSpace
    base: dict[str, Any]  # the param space: {**space.fixed, **spec.base}
    metric: str
    mode: str
    sampler: str
    seed: int | None
    scheduler: str
    grace_period: int
    reduction_factor: float
    max_t: int | None
    num_trials: int
    max_concurrent: int
    time_budget_s: float | None
    max_failed_trials: int
    cpus_per_trial: float
    gpus_per_trial: float
    data_parallel_workers: int
    default_epochs: int
    custom_resources: dict[str, float] = field(default_factory=dict)  # per worker, e.g. {"bonn_worker": 1}

    @property
    def target_epochs(self) -> int:
        e = int(self.base.get("epochs", self.default_epochs))
        return min(e, self.max_t) if self.max_t else e


def plan_from_spec(spec_dict: dict[str, Any], num_trials: int | None = None) -> StudyPlan:
    from service.core.spec import DEFAULT_EPOCHS as SPEC_DEFAULT_EPOCHS
    from service.core.spec import StudySpec

    spec = StudySpec.model_validate(spec_dict)
    space = spec.space
    base = dict(spec.trial_defaults())
    sched = spec.scheduler
    default_epochs = int(SPEC_DEFAULT_EPOCHS or DEFAULT_EPOCHS)
    epochs = int(base.get("epochs", default_epochs))
    max_t = (int(sched.max_t) if sched.max_t else epochs) if sched.type == "asha" else None
    return StudyPlan(
        name=spec.name,
        space=space,
        base=base,
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        sampler=spec.sampler.type,
        seed=spec.sampler.seed,
        scheduler=sched.type,
        grace_period=int(sched.grace_period),
        reduction_factor=float(sched.reduction_factor),
        max_t=max_t,
        num_trials=int(num_trials or spec.budget.num_trials),
        max_concurrent=int(spec.budget.max_concurrent_trials),
        time_budget_s=spec.budget.time_budget_s,
        max_failed_trials=int(spec.budget.max_failed_trials),
        cpus_per_trial=float(spec.resources.cpus_per_trial),
        gpus_per_trial=float(spec.resources.gpus_per_trial),
        data_parallel_workers=int(spec.resources.data_parallel_workers),
        default_epochs=default_epochs,
        custom_resources={str(k): float(v) for k, v in (spec.resources.custom or {}).items()},
    )


def registered_model_name(study_name: str) -> str:
    safe = "-".join(str(study_name).split())
    return f"bonn-sweep-{safe}"


# -- the monitor: progress lines, failure limit, time budget ---------------------------------------

from ray.tune import Callback  # noqa: E402  (after the light helpers above; ray is needed from here on)


class StudyMonitor(Callback):
    """Prints a line per trial event; stops new trials on the failure limit or the time budget."""

    def __init__(self, plan: StudyPlan, generator: Any = None, searcher: Any = None):
        self.plan = plan
        self.generator = generator  # service.sweep.optuna_bridge.StudySearchGenerator
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
        from service.sweep.tracking import trial_error_reason

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
        b = self.plan.time_budget_s
        if b and not self.budget_hit and self.elapsed() > b:
            self.budget_hit = True
            self._stop_new_trials()
            echo(f"time budget of {b:.0f}s reached: no new trials; running trials finish")

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        self.trial_start.setdefault(trial.trial_id, time.monotonic())
        keys = [k for k in trial.config if k not in self.plan.base]
        params = ", ".join(f"{k}={_fmt(trial.config[k])}" for k in sorted(keys))
        if trial.trial_id not in self.started:
            self.started.append(trial.trial_id)
        n = self.started.index(trial.trial_id) + 1
        echo(f"trial {self._name(trial)} started ({n} of {self.plan.num_trials}): {params}")

    def on_trial_restore(self, iteration: int, trials: list, trial, **info):
        echo(f"trial {trial} restored from its checkpoint")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        self.trial_first_result.setdefault(trial.trial_id, time.monotonic())
        t = result.get("epoch_time_s")
        if isinstance(t, (int, float)):
            self.trial_train[trial.trial_id] = self.trial_train.get(trial.trial_id, 0.0) + float(t)
        m = self.plan.metric
        epoch = result.get("epoch", result.get("training_iteration"))
        node = result.get("node_id")  # the Ray node the trial (its rank 0) runs on, from trainables.tune
        echo(f"trial {trial} epoch {epoch}/{trial.config.get('epochs', self.plan.default_epochs)} "
             f"{m}={_fmt(result.get(m))} train_loss={_fmt(result.get('train_loss'))}"
             + (f" node={node[:NODE_ID_CHARS]}" if isinstance(node, str) and node else ""))

    def _ended(self, trial, what: str) -> None:
        t0 = self.trial_start.get(trial.trial_id)
        if t0 is not None:
            self.trial_wall[trial.trial_id] = time.monotonic() - t0
        self.ended[trial.trial_id] = what

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        from service.sweep.optuna_bridge import classify_stop, epochs_done, target_epochs

        last = trial.last_result or {}
        e = epochs_done(last)
        reason = classify_stop(e, target_epochs(trial.config.get("epochs"), self.plan.default_epochs, self.plan.max_t))
        self._ended(trial, reason)
        echo(f"trial {self._name(trial)} {reason} after {e} epoch(s): "
             f"{self.plan.metric}={_fmt(last.get(self.plan.metric))}{self._times(trial)}")

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
        from service.sweep.tracking import trial_error_reason

        echo(f"trial {self._name(trial)} ERROR (after {TRIAL_MAX_FAILURES} retries){self._times(trial)}: "
             f"{trial_error_reason(trial) or '?'}; "
             f"{self.failed} failed trial(s), limit {self.plan.max_failed_trials}")
        if self.failed > self.plan.max_failed_trials and not self.failure_limit_hit:
            self.failure_limit_hit = True
            self._stop_new_trials()
            echo(f"more than {self.plan.max_failed_trials} trials failed: no new trials; the study will fail")

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


# -- the driver ------------------------------------------------------------------------------------


class StudyDriver:
    def __init__(self, payload: Payload):
        self.p = payload
        self.plan: StudyPlan | None = None
        self.cancel_requested = False
        self.t_start = time.monotonic()
        self._client = None
        self.tracker = None  # the MLflow callback, once built

    # -- MLflow parent run -------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.p.mlflow_tracking_uri)
        return self._client

    def _mlflow(self, what: str, fn, *args, **kwargs) -> Any:
        for attempt in range(3):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                if attempt == 2:
                    echo(f"warning: MLflow {what} failed: {type(exc).__name__}: {exc}")
                    return None
                time.sleep(0.5 * 2**attempt)

    def _parent_tags(self, tags: dict[str, Any]) -> None:
        if not self.p.parent_run_id:
            return
        for k, v in tags.items():
            self._mlflow(f"set_tag({k})", self.client.set_tag, self.p.parent_run_id, k, str(v))

    def _parent_end(self, status: str, mlflow_status: str) -> None:
        self._parent_tags({"status": status})
        if self.p.parent_run_id:
            self._mlflow("set_terminated(parent)", self.client.set_terminated, self.p.parent_run_id, status=mlflow_status)

    def _experiment_id(self) -> str:
        if self.p.experiment_id:
            return self.p.experiment_id
        if self.p.parent_run_id:
            run = self.client.get_run(self.p.parent_run_id)
            return run.info.experiment_id
        name = registered_model_name(self.plan.name if self.plan else self.p.study_id)
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else self.client.create_experiment(name)

    # -- SIGINT: let Tune save its state -----------------------------------------------------------
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
            self.plan = plan_from_spec(p.spec, p.num_trials)
        except Exception as exc:  # noqa: BLE001 - pydantic ValidationError, unknown preset, ...
            echo(f"study {p.study_id} FAILED: invalid spec: {exc}")
            self._parent_tags({"error": f"invalid spec: {exc}"[:5000]})
            self._parent_end("FAILED", "FAILED")
            return EXIT_BAD_PAYLOAD
        try:
            return self._run()
        except KeyboardInterrupt:
            echo(f"study {p.study_id} cancelled")
            self._parent_end("CANCELLED", "KILLED")
            return EXIT_CANCELLED
        except Exception as exc:  # noqa: BLE001
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            echo(f"study {p.study_id} FAILED: {type(exc).__name__}: {exc}")
            self._parent_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
            self._parent_end("FAILED", "FAILED")
            return EXIT_FAILED

    def _run(self) -> int:
        import optuna
        import ray
        from ray import tune

        from service.sweep.optuna_bridge import (
            DefineByRun,
            StudyConcurrencyLimiter,
            StudyOptunaSearch,
            StudySearchGenerator,
            build_sampler,
            fail_running_trials,
            grid_size,
        )
        from service.sweep.tracking import MLflowStudyCallback

        p, plan = self.p, self.plan
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        # -- storage and MLflow parent --------------------------------------------------------------
        storage = make_storage(p.optuna_storage)
        experiment_id = self._experiment_id()
        if p.parent_run_id:
            self._mlflow("update_run(parent)", self.client.update_run, p.parent_run_id, status="RUNNING")
            self._parent_tags({"status": "RUNNING", "study_id": p.study_id})

        # -- Ray ----------------------------------------------------------------------------------
        address = os.environ.get("RAY_ADDRESS", "auto")
        t = time.monotonic()
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        echo(f"connected to Ray at {address} in {time.monotonic() - t:.1f}s; "
             f"cluster CPUs={ray.cluster_resources().get('CPU', 0):g} GPUs={ray.cluster_resources().get('GPU', 0):g}")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        signal.signal(signal.SIGINT, self._on_sigint)
        # SIGTERM (a stop without RAY_JOB_STOP_SIGNAL=SIGINT) is a cancel too, not a lost Tune state
        signal.signal(signal.SIGTERM, self._on_sigint)

        # -- search ---------------------------------------------------------------------------------
        exp_path = join_uri(p.tune_storage, p.study_id)
        restoring = tune.Tuner.can_restore(exp_path)
        num_trials = plan.num_trials
        grid = None
        if plan.sampler == "grid":
            grid = plan.space.grid()
            if num_trials > grid_size(grid):
                echo(f"grid has {grid_size(grid)} points: num_trials {num_trials} -> {grid_size(grid)}")
                num_trials = grid_size(grid)
        sampler = build_sampler(plan.sampler, plan.seed, grid)
        if not restoring:
            # no Tune state: every RUNNING Optuna trial of this study is an orphan of a crashed driver
            existing = _load_study_or_none(p.study_id, storage)
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
        searcher = StudyOptunaSearch(
            DefineByRun(plan.space, drop_keys=plan.base.keys()),
            metric=plan.metric,
            mode=plan.mode,
            sampler=sampler,
            storage=storage,
            study_name=p.study_id,
            points_to_evaluate=list(getattr(plan.space, "warm_start_points", None) or []),
            # the searcher's params never hold base keys (dropped above): a trial's epochs are base's
            default_epochs=int(plan.base.get("epochs", plan.default_epochs)),
            max_t=plan.max_t,
            echo=echo,
        )
        limiter = StudyConcurrencyLimiter(searcher, max_concurrent=plan.max_concurrent)
        generator = StudySearchGenerator(limiter, num_trials=num_trials)
        scheduler = make_scheduler(plan)
        tracker = MLflowStudyCallback(
            tracking_uri=p.mlflow_tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=p.parent_run_id,
            study_id=p.study_id,
            metric=plan.metric,
            mode=plan.mode,
            default_epochs=plan.default_epochs,
            max_t=plan.max_t,
            upload=os.environ.get("BONN_SWEEP_CHECKPOINT_UPLOAD", "all"),
            optuna_link=searcher,
            echo=echo,
            # checkpoints wait here while MLflow is unreachable (a restored sweep finds them again)
            spool_dir=None if "://" in exp_path else str(Path(exp_path) / "mlflow-spool"),
        )
        self.tracker = tracker
        monitor = StudyMonitor(plan, generator=generator, searcher=searcher)
        searcher.error_reason = monitor.error_reason  # the Optuna trial's `error` attr
        callbacks = [tracker, monitor]  # order matters: callback states are restored by position

        tune_config = tune.TuneConfig(
            metric=plan.metric,
            mode=plan.mode,
            search_alg=generator,
            scheduler=scheduler,
            num_samples=max(num_trials, 1),
            max_concurrent_trials=None,  # the limiter inside `generator` enforces it
            reuse_actors=True,
            time_budget_s=None,  # StudyMonitor: stop *starting* trials after the budget
        )
        failure_config = tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES)
        checkpoint_config = tune.CheckpointConfig(
            num_to_keep=CHECKPOINTS_TO_KEEP,
            checkpoint_score_attribute=plan.metric,
            checkpoint_score_order=plan.mode,
        )
        trainable = make_trainable(plan)

        if restoring:
            echo(f"restoring Tune state from {exp_path} (num_trials {num_trials})")
            try:
                tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                           restart_errored=False, param_space=plan.base)
            except ValueError as exc:
                echo(f"warning: param space check failed on restore ({exc}); using the saved one")
                tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, restart_errored=False)
            # Tuner.restore() unpickles the TuneConfig/RunConfig objects of the *first* run; use the
            # ones built from this payload (live storage, callbacks wired to this process, num_trials)
            internal = tuner._local_tuner
            internal._tune_config = tune_config
            internal._run_config.callbacks = callbacks
            internal._run_config.failure_config = failure_config
            internal._run_config.verbose = 0
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=plan.base,
                tune_config=tune_config,
                run_config=tune.RunConfig(
                    name=p.study_id,
                    storage_path=p.tune_storage,
                    callbacks=callbacks,
                    failure_config=failure_config,
                    checkpoint_config=checkpoint_config,
                    verbose=0,  # our StudyMonitor prints one line per trial event
                ),
            )

        echo(f"study {p.study_id} ({plan.name}): {num_trials} trials, {plan.max_concurrent} concurrent, "
             f"sampler={plan.sampler} scheduler={plan.scheduler}"
             + (f"(grace={plan.grace_period}, rf={plan.reduction_factor:g}, max_t={plan.max_t})"
                if plan.scheduler == "asha" else "")
             + f", objective {plan.metric} ({plan.mode}), resources cpu={plan.cpus_per_trial:g} "
               f"gpu={plan.gpus_per_trial:g} x{plan.data_parallel_workers}"
             + "".join(f" {k}={v:g}" for k, v in sorted(plan.custom_resources.items())))
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

        study = searcher.study
        counts = _state_counts(study)
        timing = monitor.timing_summary()
        echo(f"tuning loop ended after {fit_s:.1f}s: Optuna trials {counts}; "
             + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in timing.items()))
        if tracker.timings:
            echo("MLflow callback time: " + ", ".join(
                f"{k} {n}x {sec:.2f}s" for k, (n, sec) in sorted(tracker.timings.items()))
                + (f"; {tracker.failed_calls} MLflow call(s) failed" if tracker.failed_calls else ""))

        if self.cancel_requested:
            n = 0
            for ft in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                try:
                    study._storage.set_trial_user_attr(ft._trial_id, "stop_reason", "cancelled")
                    n += 1
                except Exception:  # noqa: BLE001
                    pass
            echo(f"study {p.study_id} cancelled: Tune state saved in {exp_path}; {n} unfinished trial(s) "
                 "will continue on resume")
            self._parent_end("CANCELLED", "KILLED")
            return EXIT_CANCELLED
        if fit_error is not None:
            raise fit_error

        # hygiene: nothing can continue these any more
        orphans = fail_running_trials(study)
        if orphans:
            echo(f"marked {orphans} leftover RUNNING Optuna trial(s) FAIL")
            counts = _state_counts(study)

        if monitor.failure_limit_hit:
            msg = f"{monitor.failed} trials failed (max_failed_trials={plan.max_failed_trials})"
            echo(f"study {p.study_id} FAILED: {msg}")
            self._parent_tags({"error": msg, "trial_counts": json.dumps(counts)})
            self._parent_end("FAILED", "FAILED")
            return EXIT_FAILED

        try:
            best = study.best_trial
        except ValueError:
            best = None
        if best is None:
            msg = "no trial completed"
            echo(f"study {p.study_id} FAILED: {msg} ({counts})")
            self._parent_tags({"error": msg, "trial_counts": json.dumps(counts)})
            self._parent_end("FAILED", "FAILED")
            return EXIT_FAILED

        tags = {
            "best_trial": best.number,
            "best_tune_trial_id": best.user_attrs.get("tune_trial_id", ""),
            "best_run_id": best.user_attrs.get("mlflow_run_id", ""),
            "best_value": best.value,
            "best_epoch": best.user_attrs.get("best_epoch", ""),
            "best_checkpoint_uri": best.user_attrs.get("checkpoint_uri", ""),
            "trial_counts": json.dumps(counts),
        }
        self._parent_tags(tags)
        if p.parent_run_id:
            self._mlflow("log_metric(best_value)", self.client.log_metric, p.parent_run_id, "best_value",
                         float(best.value))
        echo(f"best trial #{best.number} ({tags['best_tune_trial_id']}): {plan.metric}={best.value:.4g} "
             f"run {tags['best_run_id']}")

        try:
            t_reg = time.monotonic()
            ref = self.register_best(study, best)
            echo(f"registered model {ref} in {time.monotonic() - t_reg:.1f}s")
        except Exception as exc:  # noqa: BLE001
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            msg = f"model registration failed: {type(exc).__name__}: {exc}"
            echo(f"study {p.study_id} FAILED: {msg} (resume retries the registration)")
            self._parent_tags({"error": msg[:5000]})
            self._parent_end("FAILED", "FAILED")
            return EXIT_FAILED

        wall = time.monotonic() - self.t_start
        self._parent_tags({"registered_model": ref, "driver_wall_s": f"{wall:.1f}"})
        self._parent_end("SUCCEEDED", "FINISHED")
        echo(f"study {p.study_id} SUCCEEDED in {wall:.1f}s: {counts}; best #{best.number} "
             f"{plan.metric}={best.value:.4g}; model {ref}")
        return EXIT_OK

    # -- model registry ----------------------------------------------------------------------------
    def register_best(self, study, best) -> str:
        """Log the best trial's best checkpoint as an MLflow PyTorch model under its run and register it."""
        import mlflow

        name = registered_model_name(self.plan.name)
        existing = study.user_attrs.get("registered_model")
        if existing and study.user_attrs.get("registered_trial") == best.number:
            return existing  # a resumed driver after a successful registration
        run_id = best.user_attrs.get("mlflow_run_id")
        if not run_id:
            raise RuntimeError(f"best trial #{best.number} has no MLflow run")
        ckpt = self._fetch_checkpoint(best)
        import trainables

        from service.sweep.tracking import inference_model

        model, config = trainables.load_checkpoint_model(ckpt)
        # a local class: cloudpickle stores it by value, so loading needs torch + trainables only
        model = inference_model(model.to("cpu").eval())
        mlflow.set_tracking_uri(self.p.mlflow_tracking_uri)
        run = self.client.get_run(run_id)
        status = run.info.status
        code_paths = [str(Path(trainables.__file__).resolve().parent)]
        import torch

        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    registered_model_name=name,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                    code_paths=code_paths,
                    # mlflow 3.17 defaults to "pt2", which traces forward() and needs an input example;
                    # the pickled module (+ the trainables package as code) loads anywhere
                    serialization_format="pickle",
                    await_registration_for=120,
                )
        finally:
            if status != "RUNNING":
                self._mlflow("set_terminated(best run)", self.client.set_terminated, run_id, status=status)
        version = getattr(info, "registered_model_version", None)
        if version is None:
            versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            version = max(int(v.version) for v in versions)
        for k, v in {
            "study_id": self.p.study_id,
            "optuna_trial": best.number,
            "tune_trial_id": best.user_attrs.get("tune_trial_id", ""),
            "objective": f"{self.plan.metric}={best.value}",
            "best_epoch": best.user_attrs.get("best_epoch", ""),
            "checkpoint_uri": best.user_attrs.get("checkpoint_uri", ""),
        }.items():
            self._mlflow("set_model_version_tag", self.client.set_model_version_tag, name, str(version), k, str(v))
        ref = f"{name}/{version}"
        study.set_user_attr("registered_model", ref)
        study.set_user_attr("registered_trial", best.number)
        return ref

    def _fetch_checkpoint(self, best) -> str:
        """Local path of the best trial's best checkpoint.pt: from MLflow, else Tune's storage."""
        import mlflow

        uri = best.user_attrs.get("checkpoint_uri")
        if uri:
            try:
                d = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/checkpoint.pt",
                                                        tracking_uri=self.p.mlflow_tracking_uri)
                return d
            except Exception as exc:  # noqa: BLE001
                echo(f"warning: could not download {uri}: {exc}; trying Tune's checkpoint")
        tid = best.user_attrs.get("tune_trial_id")
        exp = Path(join_uri(self.p.tune_storage, self.p.study_id))
        if tid and exp.is_dir():
            cands = sorted(exp.glob(f"*{tid}*/checkpoint_*/checkpoint.pt"))
            if cands:
                return str(cands[-1])
        raise RuntimeError(f"no checkpoint found for best trial #{best.number}")


# -- building blocks ---------------------------------------------------------------------------------


def make_storage(url: str):
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # the API reads the same file while the driver writes: wait for locks instead of failing
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def make_scheduler(plan: StudyPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=int(plan.max_t or plan.default_epochs),
            grace_period=plan.grace_period,
            reduction_factor=plan.reduction_factor,
        )
    return FIFOScheduler()


def trial_bundles(plan: StudyPlan) -> list[dict[str, float]]:
    """The placement-group bundles of one trial: one per data-parallel worker, each with the per-worker
    CPUs, GPUs and custom resources (bundle 0 is the trial actor itself = rank 0; trainables/tune.py
    puts ranks 1..N-1 in the others). Custom resources pin trials to the nodes that offer them."""
    per = {"CPU": plan.cpus_per_trial, "GPU": plan.gpus_per_trial, **plan.custom_resources}
    return [dict(per) for _ in range(max(1, plan.data_parallel_workers))]


def make_trainable(plan: StudyPlan):
    from ray import tune
    from ray.tune import PlacementGroupFactory

    from trainables.tune import train_bonn

    # PACK: a data-parallel trial's workers share a node when one has room (fast gloo/NCCL), else spread
    return tune.with_resources(train_bonn, PlacementGroupFactory(trial_bundles(plan), strategy="PACK"))


def join_uri(base: str, name: str) -> str:
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return str(Path(base).expanduser().absolute() / name)


def _load_study_or_none(study_name: str, storage):
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


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
