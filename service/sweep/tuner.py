"""Building a study's Ray Tune run: storage, scheduler, trainable, and the Tuner, fresh or restored.

A fresh study gets ``Tuner(with_resources(trainables.tune.train_bonn, one placement-group bundle per
data-parallel worker), TuneConfig(search_alg, scheduler=ASHA|FIFO, reuse_actors=True),
RunConfig(storage_path=tune_storage, name=study_id, callbacks, FailureConfig(max_failures=2),
checkpoint_config(spec.checkpoints.keep)))``. When Tune state for the study exists,
``Tuner.restore(resume_errored=True)`` continues it with the search algorithm, scheduler and
callbacks rebuilt from the payload (:func:`use_live_configs`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from service.core.payload import JobPayload

TRIAL_MAX_FAILURES = 2  # retries per trial (Tune FailureConfig.max_failures)


def join_uri(base: str, name: str) -> str:
    """``base/name`` for a URI, else the absolute local path."""
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return str(Path(base).expanduser().absolute() / name)


def connect_ray(echo: Callable[[str], None]) -> None:
    """``ray.init`` on ``$RAY_ADDRESS`` (default ``auto``: the cluster this job runs on)."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "auto")
    t = time.monotonic()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    res = ray.cluster_resources()
    echo(f"connected to Ray at {address} in {time.monotonic() - t:.1f}s; "
         f"cluster CPUs={res.get('CPU', 0):g} GPUs={res.get('GPU', 0):g}")


#: seconds between saves of Tune's experiment state (Ray's default "auto" is at least 10 s)
TUNE_STATE_PERIOD_S = "1"


def save_tune_state_often() -> str:
    """Make Tune save its experiment state (trials, searcher) about every second instead of every
    ~10 s, so a killed driver loses at most the last second of trial completions: Tune's step loop
    saves the state when the period has passed, and it steps at least once a trial completes. The
    period is ``TUNE_GLOBAL_CHECKPOINT_S`` (read by Ray when the Tuner runs); a value already set in
    the environment wins, else ``BONN_SWEEP_TUNE_STATE_PERIOD_S`` (default 1). Returns the period."""
    period = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S") or os.environ.get("BONN_SWEEP_TUNE_STATE_PERIOD_S") \
        or TUNE_STATE_PERIOD_S
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = period
    # Frequent snapshots are the point here, and ``checkpoints.keep`` (``num_to_keep=1``) makes Tune force
    # one whenever a trial checkpoints: Ray's "snapshotting triggered multiple times" warning would then
    # repeat every epoch in the job log. A value set in the environment still wins.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return period


def make_storage(url: str):
    """The Optuna RDB storage of the study; on a server database its calls ride out a restart
    (service/sweep/db_retry.py)."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # the API reads the same file while the driver writes: wait for locks instead of failing
        engine_kwargs["connect_args"] = {"timeout": 60}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    from service.sweep.db_retry import RetryingRDBStorage

    engine_kwargs["pool_pre_ping"] = True
    return RetryingRDBStorage(url, engine_kwargs=engine_kwargs)


def make_scheduler(p: JobPayload):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = p.study_spec.scheduler
    if sched.type == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=int(p.max_t or p.epochs),
            grace_period=int(sched.grace_period),
            reduction_factor=float(sched.reduction_factor),
        )
    return FIFOScheduler()


def trial_bundles(p: JobPayload) -> list[dict[str, float]]:
    """The placement-group bundles of one trial: one per data-parallel worker, each with the per-worker
    CPUs, GPUs and custom resources (bundle 0 is the trial actor itself = rank 0; trainables/tune.py
    puts ranks 1..N-1 in the others). Custom resources pin trials to the nodes that offer them."""
    r = p.study_spec.resources
    per = {"CPU": float(r.cpus_per_trial), "GPU": float(r.gpus_per_trial), **p.custom_resources}
    return [dict(per) for _ in range(max(1, int(r.data_parallel_workers)))]


def make_trainable(p: JobPayload):
    from ray import tune
    from ray.tune import PlacementGroupFactory

    from trainables.tune import train_bonn

    # PACK: a data-parallel trial's workers share a node when one has room (fast gloo/NCCL), else spread
    return tune.with_resources(train_bonn, PlacementGroupFactory(trial_bundles(p), strategy="PACK"))


def build_tuner(p: JobPayload, *, exp_path: str, restoring: bool, search_alg: Any, scheduler: Any,
                callbacks: list, num_trials: int, echo: Callable[[str], None], name: str | None = None):
    """The study's ``Tuner``: restored from ``exp_path`` when ``restoring``, else a fresh one, named
    ``name`` (default: the study id; the confirmation stage runs its own experiment). Tune keeps the
    checkpoints that ``checkpoints.keep`` asks for (:func:`checkpoint_config`): by default the best by the
    objective and the latest, which covers either ``objective.selection``."""
    from ray import tune

    spec = p.study_spec
    tune_config = tune.TuneConfig(
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=max(num_trials, 1),
        max_concurrent_trials=None,  # the limiter inside `search_alg` enforces it
        reuse_actors=True,
        time_budget_s=None,  # StudyMonitor: stop *starting* trials after the budget
    )
    failure_config = tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES)
    trainable = make_trainable(p)
    if restoring:
        echo(f"restoring Tune state from {exp_path} (num_trials {num_trials})")
        try:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                       restart_errored=False, param_space=p.trial_defaults)
        except ValueError as exc:
            echo(f"warning: param space check failed on restore ({exc}); using the saved one")
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, restart_errored=False)
        use_live_configs(tuner, tune_config, callbacks, failure_config)
        return tuner
    return tune.Tuner(
        trainable,
        param_space=p.trial_defaults,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name or p.study_id,
            storage_path=p.tune_storage,
            callbacks=callbacks,
            failure_config=failure_config,
            checkpoint_config=checkpoint_config(p),
            verbose=0,  # our StudyMonitor prints one line per trial event
        ),
    )


def checkpoint_config(p: JobPayload):
    """Tune's ``CheckpointConfig`` for the study's ``checkpoints.keep``. Tune never deletes a trial's
    latest checkpoint (``ray.train._internal.checkpoint_manager``), so ``num_to_keep=1`` scored by the
    objective keeps the best epoch and the latest one: at most two per trial, and resume stays exact."""
    from ray import tune

    spec = p.study_spec
    keep = spec.checkpoints.keep
    if keep == "all":
        return tune.CheckpointConfig(num_to_keep=None)
    if keep == "last":
        return tune.CheckpointConfig(num_to_keep=1)
    return tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=spec.objective.metric,
                                 checkpoint_score_order=spec.objective.mode)


def use_live_configs(tuner: Any, tune_config: Any, callbacks: list, failure_config: Any) -> None:
    """Give a restored Tuner this driver's TuneConfig, callbacks and FailureConfig.

    Ray 2.x's ``Tuner.restore()`` unpickles the TuneConfig and RunConfig of the study's *first* run
    from ``tuner.pkl`` and offers no argument to replace them; the search algorithm (``num_trials``
    may have grown), the callbacks (wired to this process: its Optuna searcher, its echo) and the
    failure policy must be the live ones, so they are set on the private ``tuner._local_tuner``.
    """
    internal = tuner._local_tuner
    internal._tune_config = tune_config
    internal._run_config.callbacks = callbacks
    internal._run_config.failure_config = failure_config
    internal._run_config.verbose = 0
