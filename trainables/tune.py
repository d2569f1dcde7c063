"""The Ray Tune function trainable around ``fit`` (the only module of ``trainables`` that imports Ray).

``train_bonn(config)`` restores from ``ray.tune.get_checkpoint()`` by copying its ``checkpoint.pt`` into
a fresh local folder, then runs ``fit(config, report, checkpoint_dir=that folder)``; after every epoch
``fit`` writes the checkpoint (and the epoch's histogram PNG) there and ``report`` hands the folder to
``ray.tune.report(metrics, checkpoint=Checkpoint.from_directory(folder))``, which persists a copy to
the run's storage before returning. The local folder is removed when the trial ends. Every result
also carries ``node_id`` (a string: the Ray node the trial -- its rank 0 -- ran on; not a metric, so
MLflow does not log it; it lands in Tune's ``result.json``).

Data-parallel trials. A trial whose resources are a placement group of N > 1 bundles (the study
driver asks for ``[{CPU: cpus_per_trial, GPU: gpus_per_trial, **custom}] * data_parallel_workers``)
trains on all of them with ``torch.distributed``:

* rank 0 is this trial actor itself, in bundle 0 (Tune schedules the trainable there); ranks
  1..N-1 are actors of :class:`_RankWorker` placed in bundles 1..N-1 of the trial's placement group,
  each with that bundle's resources, so Tune's gang reservation covers every worker and nothing
  runs outside the trial's resources;
* rendezvous: rank 0 opens a ``torch.distributed.TCPStore`` on a free port of its node; the
  process group uses NCCL when the trial trains on CUDA, gloo on the CPU; every collective times out
  after ``BONN_SWEEP_DDP_TIMEOUT_S`` seconds (default 600);
* every rank runs ``fit`` with the same config (data-parallel semantics: ``trainables.train``,
  "Data parallelism": ``batch_size`` is the global batch); only rank 0 gets the checkpoint folder
  and the ``report``, so the trial's reports, checkpoints, restore and MLflow flow are exactly
  those of a one-worker trial (``world_size`` is added to the metrics);
* failures: a rank that raises tears its process group down, so the others fail fast in their next
  collective; rank 0 then raises the failing worker's own error when it can get it. A lost worker
  node does the same (or hits the timeout). Tune then retries the trial from its last checkpoint
  (``FailureConfig``); the worker actors are killed when the trial ends in any way (completed,
  stopped by ASHA, errored), and die with the trial actor if that dies.

Why not Ray Train's ``TorchTrainer`` inside the trial (the Ray 2.60 "Train V2" pattern)? Checked in
the installed Ray: ``ray.tune.integration.ray_train.TuneReportCallback`` forwards only metrics to Tune
(a checkpoint becomes a ``checkpoint_path`` string), so Tune would hold no checkpoints -- no Tune-level
resume, no MLflow checkpoint artifacts; the V2 ``TorchTrainer`` rejects ``resume_from_checkpoint``;
it reserves its own placement group outside the trial's (the trial would then need resources of its
own on top, which deadlocks a small cluster) and an ASHA stop cannot abort it short of killing the
trial actor. The process group set up here is the same one Ray Train's ``TorchConfig`` builds
(``init_process_group`` over a TCP rendezvous on rank 0's node).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping

from .checkpoint import CHECKPOINT_NAME
from .train import fit

__all__ = ["train_bonn", "DDP_TIMEOUT_ENV"]

DDP_TIMEOUT_ENV = "BONN_SWEEP_DDP_TIMEOUT_S"
DEFAULT_DDP_TIMEOUT_S = 600.0
_WORKER_LOG_PREFIXES = ("[resume]", "[warn]", "[I] data-parallel")


def train_bonn(config: Mapping[str, Any]) -> None:
    import ray
    from ray import tune

    # (never ray.get_runtime_context() outside a Ray worker: it would start a local Ray instance)
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    bundles = _trial_bundles()
    local = Path(tempfile.mkdtemp(prefix="bonn-trial-"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                src = Path(d) / CHECKPOINT_NAME
                if src.exists():
                    shutil.copy2(src, local / CHECKPOINT_NAME)

        def report(metrics: dict) -> None:
            tune.report({**metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(str(local)))

        if len(bundles) > 1:
            _fit_data_parallel(dict(config), bundles, report, local)
        else:
            fit(dict(config), report=report, checkpoint_dir=local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


# -- data parallelism --------------------------------------------------------------------------------


def _trial_bundles() -> list[dict[str, float]]:
    """The bundles of this trial's resource request (one per data-parallel worker; bundle 0 holds this
    trial actor). Outside a Tune session (tests, a notebook): one worker."""
    from ray import tune
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if not _in_tune_session():
        return [{}]
    pgf = tune.get_context().get_trial_resources()
    if pgf is None or getattr(pgf, "head_bundle_is_empty", False):
        return [{}]  # no bundle of its own for the trial actor: not a layout the study driver makes
    return list(pgf.bundles) or [{}]


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(DDP_TIMEOUT_ENV, DEFAULT_DDP_TIMEOUT_S)))


def _backend(config: Mapping[str, Any]) -> str:
    import torch

    return "nccl" if config.get("device", "auto") != "cpu" and torch.cuda.is_available() else "gloo"


class _RankWorker:
    """Rank r >= 1 of a data-parallel trial: one Ray actor in bundle r of the trial's placement group."""

    def run(self, config: dict, rank: int, world: int, backend: str, host: str, port: int,
            timeout_s: float) -> dict:
        import ray
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            fit(config, report=None, checkpoint_dir=None, log=_worker_log(rank))
        except BaseException as exc:
            # tearing the group down makes the other ranks fail in their next collective (no hang)
            _destroy_group()
            raise RuntimeError(f"data-parallel rank {rank} failed: {type(exc).__name__}: {exc}\n"
                               f"{traceback.format_exc()}") from None
        _destroy_group()
        return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id()}


def _worker_log(rank: int) -> Callable[[str], None]:
    def log(line: str) -> None:
        if line.startswith(_WORKER_LOG_PREFIXES):
            print(f"[rank {rank}] {line}", flush=True)

    return log


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def _fit_data_parallel(config: dict, bundles: list[dict[str, float]], report: Callable[[dict], None],
                       checkpoint_dir: Path) -> None:
    """Run ``fit`` as rank 0 here and as ranks 1..N-1 in actors in bundles 1..N-1 of this trial."""
    import ray
    import torch.distributed as dist
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = len(bundles)
    pg = get_current_placement_group()
    if pg is None:
        raise RuntimeError(f"a data-parallel trial ({world} bundles) must run in its placement group")
    backend = _backend(config)
    timeout = _timeout()
    host = ray.util.get_node_ip_address()
    _destroy_group()  # a reused trial actor: nothing of a previous trial may linger
    store = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
    worker_cls = ray.remote(max_restarts=0, max_task_retries=0)(_RankWorker)
    workers, refs = [], []
    try:
        for rank in range(1, world):
            b = dict(bundles[rank])
            opts: dict[str, Any] = {
                "num_cpus": b.pop("CPU", 0.0),
                "num_gpus": b.pop("GPU", 0.0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank),
            }
            if "memory" in b:
                opts["memory"] = b.pop("memory")
            if b:
                opts["resources"] = b
            w = worker_cls.options(**opts).remote()
            workers.append(w)
            refs.append(w.run.remote(config, rank, world, backend, host, store.port, timeout.total_seconds()))
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=timeout)
        try:
            fit(config, report=report, checkpoint_dir=checkpoint_dir)
        except Exception as exc:
            _destroy_group()
            if _is_comm_error(exc):  # rank 0 only saw a peer go away: report the peer's own error
                err = _worker_error(refs, wait_s=15.0)
                if err is not None:
                    raise RuntimeError(f"data-parallel training failed on a worker: {err}") from exc
            raise
        _destroy_group()
        ray.get(refs, timeout=timeout.total_seconds())  # a worker's own error, if any
    finally:
        _destroy_group()
        for w in workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        del store


def _is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(k in text for k in ("Connection closed", "Connection reset", "gloo", "NCCL", "Socket Timeout"))


def _worker_error(refs: list, wait_s: float) -> str | None:
    """The first error among the workers' results within ``wait_s`` seconds, as text."""
    import ray

    if not refs:
        return None
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for ref in done:
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
    return None
