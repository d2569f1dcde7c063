"""Data parallelism of ``fit``: ``DistContext``, the rank, world size and the few collectives it needs.

``torch.distributed`` is initialised by the caller with world size W > 1 (e.g. by ``trainables.tune``
for a trial with ``data_parallel_workers`` > 1; gloo on CPU, NCCL on CUDA). Every worker runs ``fit``
with the same config; ``fit`` then behaves as one training on W devices:

* ``batch_size`` is the **global** batch: each step's batch (the same permutation and augmentation
  draws on every worker, from identically seeded generators) is cut into W contiguous slices, one
  per worker (``DeviceData.train_batches(shard=...)``); ``batch_size`` must be >= W. Steps per
  epoch, the lr schedule and the checkpoints are those of the single-process run.
* Gradients are all-reduced (averaged) after every backward, as one flat buffer per dtype, over
  every parameter the optimiser holds (model, ``mu``/``sigma``/``w`` of the kernel prior, the
  feature loss' ``centers``/``log_var``). The model is not wrapped in ``DistributedDataParallel``:
  the kernel loss and the feature loss use parameters outside the model's forward, and the set of
  parameters with gradients changes with the epoch (feature loss start) and ``lam``, which DDP's
  reducer cannot follow without ``find_unused_parameters`` (which would misclassify them). Worker r
  scales its cross-entropy and feature loss by ``n_r * W / B`` (``n_r`` its slice, ``B`` the global
  batch), so the averaged gradient is the gradient of the global-batch mean loss; the Bayesian
  kernel loss depends only on the parameters, is computed on every worker's replica (the replicas
  are identical) and is not scaled, so its averaged gradient is its own.
* The feature-loss centres follow the center-loss rule (``BayesianFeatureLoss``): their ``.grad``
  on worker r is ``sum_{i in slice r, y_i=j} (c_j - f_i) / (1 + n_j^r)`` with ``n_j^r`` the class
  count *in that worker's slice*, independent of the loss scale. After averaging, each centre moves by the
  mean over workers of their slice-wise center-loss steps: close to the single-process step when
  every worker sees many samples of a class, smaller when few do (a worker without class j in its
  slice contributes 0 for ``c_j``).
* BatchNorm normalises with the statistics of each worker's slice (as plain DDP does; no
  SyncBatchNorm); the running statistics are averaged over the workers after every epoch, before
  evaluation and the checkpoint, so all replicas stay identical.
* The parameters and buffers are broadcast from rank 0 at the start; on resume only rank 0 reads
  ``checkpoint.pt`` and broadcasts it (RNG states included: every worker's data generator must stay
  in step). Validation and test batches are split across the workers like training batches.
* Metrics are all-reduced, so every worker computes the same numbers: loss terms are the mean over
  steps of the global-batch loss, accuracies count every worker's samples, ``images_per_s`` is the
  global throughput over the slowest worker's training time, ``epoch_time_s`` the slowest worker's;
  the report carries ``world_size`` too. Only rank 0 writes checkpoints and PNGs
  (``checkpoint_dir`` is ignored on the other ranks); ``report`` is called on every rank that
  passes one (``trainables.tune`` passes it on rank 0 only).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DistContext"]


class DistContext:
    """Rank and world size of the ``torch.distributed`` process group fit runs in (1 = none), and the
    few collectives ``fit`` needs. Inactive (every method a no-op) without an initialised group of
    more than one process."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.active = bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.backend = str(dist.get_backend()) if self.active else None

    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.active else None

    def slice_bounds(self, n: int) -> tuple[int, int]:
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """In-place mean over the workers of ``tensors`` (one flat buffer per dtype)."""
        if not self.active or not tensors:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = _flatten_dense_tensors(ts)
            self.all_reduce_(flat)
            flat.div_(self.world)
            for t, r in zip(ts, _unflatten_dense_tensors(flat, ts)):
                t.copy_(r)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        if self.active:
            import torch.distributed as dist

            for t in tensors:
                dist.broadcast(t, src=0)

    def broadcast_object(self, obj: Any, device: torch.device) -> Any:
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=device if self.backend == "nccl" else None)
        return box[0]
