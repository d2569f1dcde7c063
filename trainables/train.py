"""``fit(config)``: parameter groups, schedule, the training loop, evaluation, checkpoints.

Reads as chapters: errors; learning-rate schedule; parameter groups; the ``Trainer`` (one training
step, evaluation, state); checkpoints; ``fit``. The interface is pinned in docs/contracts.md.

Loss (Eq. 10): ``L = CE + L_K + L_F`` with the Bayesian kernel loss ``L_K``
(``trainables.losses.bayesian_kernel_loss``, weight ``lam``) over every ``BonnConv2d`` and the
Bayesian feature loss ``L_F`` (``BayesianFeatureLoss``, weight ``theta``) on the FC input. Both exist
only for ``binarize="bonn"``; ``xnor`` and ``none`` train with cross-entropy alone. ``L_F`` is
switched on at epoch ``feature_loss_start_epoch`` (0-based; before it, it is not computed and logged
as 0), and skipped entirely when ``theta == 0``; ``L_K`` is skipped when ``lam == 0``.

Optimiser (Alg. 1 line 13; bonn-method.md §4): ``optimizer`` = ``sgd`` (the paper's; ``momentum``,
nesterov off), ``adam`` (L2 weight decay added to the gradient) or ``adamw`` (decoupled weight decay;
``adam_beta2``, beta1 = ``momentum``); five groups, printed with their counts at start:

========== ================================================== ======================== ==============
group      parameters                                         lr                       weight decay
========== ================================================== ======================== ==============
latent     latent kernels of the binary 3x3 convs (BONN ``X``, ``lr * latent_lr_ratio``  latent_weight_decay
           XNOR ``W``)                                                                 (null: weight_decay)
decay      other conv and linear weights (stem, 1x1, FC, FP   ``lr``                   weight_decay
           backbone convs)
no_decay   BatchNorm, PReLU, biases, ``mu``                   ``lr``                   0
slow       ``w`` and ``sigma`` of every BonnConv2d, ``log_var`` ``lr * lr_slow_ratio``  0
centers    class centres ``c_m`` (center-loss rule, Wen et al.) ``center_lr``, momentum 0 0
========== ================================================== ======================== ==============

The centres always follow the center-loss rule ``c <- c - alpha * dc`` (a plain SGD step of their own,
``Trainer.center_optimizer``), whatever ``optimizer`` the other groups use.

The schedule (per step; ``step``: multiply by ``lr_gamma`` at ``round(f * epochs)`` for every ``f`` in
``lr_milestones``; ``cosine``: half cosine to 0 over the epochs after the warm-up; optional linear
warm-up over ``warmup_epochs``) scales every group but ``centers``, whose rate is the fixed ``alpha``
of the center loss.

After every optimiser step: ``mu_sigma_update="closed_form"`` sets ``mu``/``sigma`` to their exact
minimisers (``closed_form_mu_sigma_``); ``mu``, ``sigma`` are then clamped positive (``clamp_prior_``).
``xnor`` clips its latent weights to [-1, 1] (larq ``WeightClip``; BONN does not call for a clip, its
STE mask ``|w X| <= 1`` already starves weights outside).

Runtime: on CUDA, bf16 autocast (``amp``) and channels_last (``channels_last``) by default, optional
``torch.compile`` of the model. Also on CUDA by default: ``fused_bonn`` (every BONN layer's binary
kernel and the kernel loss in one autograd node, ``trainables.fast.fused``; same values and gradients as
the per-layer reference) and ``cuda_graph`` (the whole step captured as a CUDA graph per batch shape
and feature-loss state after 3 eager warm-up steps, then replayed; the scheduler writes the learning
rates into device tensors the graph reads; not with data parallelism). Loss sums and correct counts
are accumulated on the device and read once per epoch (one host sync per epoch in the training loop);
a non-finite epoch loss raises ``TrainingDiverged`` then. ``images_per_s`` = training images / wall
time of the training loop.

Checkpoints (``checkpoint_dir/checkpoint.pt``, written atomically after every epoch): model, optimiser,
scheduler, feature-loss state, RNG states (torch CPU, CUDA, NumPy, Python, the data generator), epoch,
best validation accuracy and the metric history. Loadable with ``torch.load(weights_only=True)``. If
the file exists when ``fit`` starts, training resumes from it and continues exactly as the
uninterrupted run would. Histogram PNGs (``weights_hist_epoch{E:03d}.png``, paper Fig. 3) are written
after epochs listed in ``hist_epochs``; the epoch-0 plot (initial weights) travels with the first
checkpoint of a fresh run; every later checkpoint carries only its own epoch's plot.

Data parallelism (``torch.distributed`` initialised by the caller with world size W > 1, e.g. by
``trainables.tune`` for a trial with ``data_parallel_workers`` > 1; gloo on CPU, NCCL on CUDA). Every
worker runs ``fit`` with the same config; ``fit`` then behaves as one training on W devices:

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

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, TrainConfig
from .data import DeviceData
from .dynamics import Dynamics
from .metrics import bimodality_coefficient, first_binary_weights, save_weight_histogram
from .models import build_model

__all__ = ["fit", "TrainingDiverged", "load_checkpoint_model", "Trainer", "build_param_groups",
           "LrFactor", "CHECKPOINT_NAME", "METRIC_KEYS", "DistContext"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: latent group, center optimiser, dynamics state
METRIC_KEYS = ("epoch", "train_loss", "ce_loss", "kernel_loss", "feature_loss", "train_acc", "val_acc",
               "val_loss", "images_per_s", "bimodality", "lr", "epoch_time_s", "flip_frac", "flip_frac_init",
               "latent_abs_mean")
EVAL_BATCH = 1024


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


# ============================================================================ learning-rate schedule
def milestone_epochs(fractions, epochs: int) -> list[int]:
    """Step-schedule milestones as epochs: ``fraction * epochs`` rounded half up, never epoch 0
    (0.3/0.6/0.8 of 200 -> 60/120/160, the WRN recipe the paper follows on CIFAR)."""
    return [max(1, math.floor(f * epochs + 0.5)) for f in fractions]


class LrFactor:
    """Multiplier of the base lr after ``step`` optimiser steps (a picklable ``LambdaLR`` lambda)."""

    def __init__(self, schedule: str, epochs: int, steps_per_epoch: int, milestones=(), gamma: float = 1.0,
                 warmup_epochs: int = 0):
        self.schedule, self.epochs, self.steps_per_epoch = schedule, epochs, steps_per_epoch
        self.milestone_epochs = milestone_epochs(milestones, epochs)
        self.gamma, self.warmup_epochs = gamma, warmup_epochs

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        t = step / self.steps_per_epoch
        if self.schedule == "step":
            f = self.gamma ** sum(epoch >= m for m in self.milestone_epochs)
        else:  # cosine after the warm-up
            span = max(self.epochs - self.warmup_epochs, 1e-9)
            p = min(max((t - self.warmup_epochs) / span, 0.0), 1.0)
            f = 0.5 * (1.0 + math.cos(math.pi * p))
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            f *= (step + 1) / (self.warmup_epochs * self.steps_per_epoch)
        return f


class ConstantFactor:
    def __call__(self, step: int) -> float:
        return 1.0


# ============================================================================ parameter groups
def build_param_groups(model: nn.Module, feature_loss: nn.Module | None, cfg: TrainConfig,
                       log: Callable[[str], None] | None = print) -> list[dict]:
    """Explicit groups (see the module docstring); prints each group with its counts."""
    from .layers import bonn_layers

    role: dict[int, str] = {}
    if cfg.binarize != "none":
        for m in model.modules():
            if getattr(m, "_backbone_conv", False):
                role[id(m.weight)] = "latent"
    for m in bonn_layers(model):
        role[id(m.weight)] = "latent"
        role[id(m.w)] = "slow"
        role[id(m.sigma)] = "slow"
        role[id(m.mu)] = "no_decay"
        if m.bias is not None:
            role[id(m.bias)] = "no_decay"
    if feature_loss is not None:
        role[id(feature_loss.centers)] = "centers"
        role[id(feature_loss.log_var)] = "slow"
    names: dict[str, list[str]] = {g: [] for g in GROUP_NAMES}
    params: dict[str, list[nn.Parameter]] = {k: [] for k in names}
    seen: set[int] = set()
    named = [("model." + n, mod, pn, p) for n, mod in model.named_modules()
             for pn, p in mod.named_parameters(recurse=False)]
    if feature_loss is not None:
        named += [("feature_loss", feature_loss, pn, p) for pn, p in feature_loss.named_parameters(recurse=False)]
    for mod_name, mod, pn, p in named:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        r = role.get(id(p))
        if r is None:
            r = "decay" if isinstance(mod, (nn.Conv2d, nn.Linear)) and pn == "weight" else "no_decay"
        names[r].append(f"{mod_name}.{pn}")
        params[r].append(p)
    latent_wd = cfg.weight_decay if cfg.latent_weight_decay is None else cfg.latent_weight_decay
    settings = {
        "latent": dict(lr=cfg.lr * cfg.latent_lr_ratio, weight_decay=latent_wd, momentum=cfg.momentum),
        "decay": dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum),
        "no_decay": dict(lr=cfg.lr, weight_decay=0.0, momentum=cfg.momentum),
        "slow": dict(lr=cfg.lr * cfg.lr_slow_ratio, weight_decay=0.0, momentum=cfg.momentum),
        "centers": dict(lr=cfg.center_lr, weight_decay=0.0, momentum=0.0),
    }
    groups = []
    for g in GROUP_NAMES:
        if params[g]:
            groups.append({"params": params[g], "name": g, **settings[g]})
            if log:
                n_el = sum(p.numel() for p in params[g])
                s = settings[g]
                opt = "sgd" if g == "centers" else cfg.optimizer
                log(f"[optim] {g:9s} {len(params[g]):4d} tensors {n_el:>10,d} params  {opt} lr={s['lr']:g} "
                    f"wd={s['weight_decay']:g} momentum={s['momentum']:g}")
    return groups


GROUP_NAMES = ("latent", "decay", "no_decay", "slow", "centers")


def make_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device, capturable: bool
                   ) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` over ``groups`` (each group's ``momentum`` is SGD's momentum or
    Adam's beta1)."""
    on_cuda = device.type == "cuda"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False,
                               **({"fused": True} if on_cuda else {}))
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    adam_groups = [{**{k: v for k, v in g.items() if k != "momentum"}, "betas": (g["momentum"], cfg.adam_beta2)}
                   for g in groups]
    kw: dict[str, Any] = {"fused": True, "capturable": capturable} if on_cuda else {}
    return cls(adam_groups, lr=cfg.lr, betas=(cfg.momentum, cfg.adam_beta2), **kw)


# ============================================================================ data parallelism
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


# ============================================================================ trainer
def resolve_runtime(cfg: TrainConfig) -> tuple[torch.device, bool, bool]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but torch.cuda.is_available() is false", cfg.device)
    dev = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    amp = (dev.type == "cuda") if cfg.amp == "auto" else bool(cfg.amp)
    cl = (dev.type == "cuda") if cfg.channels_last == "auto" else bool(cfg.channels_last)
    return dev, amp, cl


#: What ``fused_bonn: auto`` means on CUDA (on CPU it means false).
FUSED_BONN_AUTO_CUDA: bool | str = "compiled"


@dataclass
class _CapturedStep:
    """One training step captured as a CUDA graph, with the input tensors it reads."""

    x: torch.Tensor
    y: torch.Tensor
    graph: Any


class Trainer:
    """Model, losses, optimiser and schedule of one training; ``train_step`` is the whole step."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, num_classes: int, device: torch.device,
                 steps_per_epoch: int, amp: bool = False, channels_last: bool = False,
                 log: Callable[[str], None] | None = print, dist: DistContext | None = None):
        from .layers import bonn_layers

        self.cfg, self.device, self.amp, self.channels_last = cfg, device, amp, channels_last
        self.log = log
        self.dist = dist or DistContext()
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.layers = bonn_layers(self.model)
        self.bonn = cfg.binarize == "bonn" and bool(self.layers)
        self.feature_loss = None
        if self.bonn:
            from .losses import BayesianFeatureLoss

            self.feature_loss = BayesianFeatureLoss(num_classes, model.feature_dim, cfg.theta,
                                                    cfg.center_lr).to(device)
        self.kernel_on = self.bonn and cfg.lam > 0
        self.feature_on = False  # switched per epoch by set_epoch
        self.xnor_weights = ([m.weight for m in self.model.modules() if getattr(m, "_backbone_conv", False)]
                             if cfg.binarize == "xnor" else [])
        on_cuda = device.type == "cuda"
        want_graph = on_cuda if cfg.cuda_graph == "auto" else bool(cfg.cuda_graph)
        self.use_graph = want_graph and on_cuda and not self.dist.active
        groups = build_param_groups(self.model, self.feature_loss, cfg, log=log)
        center_groups = [g for g in groups if g["name"] == "centers"]
        groups = [g for g in groups if g["name"] != "centers"]
        self.optimizer = make_optimizer(groups, cfg, device, capturable=self.use_graph)
        # the centre update of the center loss is its own plain SGD step (lr alpha, no momentum)
        self.center_optimizer = (torch.optim.SGD(center_groups, lr=cfg.center_lr, momentum=0.0)
                                 if center_groups else None)
        self._init_momentum_buffers()
        self.steps_per_epoch = steps_per_epoch
        # Runtime choices (docs/contracts.md): one autograd node for all BONN layers' kernels and
        # kernel loss (trainables.fused), and the whole step captured as a CUDA graph.
        fb = cfg.fused_bonn if cfg.fused_bonn != "auto" else (FUSED_BONN_AUTO_CUDA if on_cuda else False)
        self.fused = self.bonn and not cfg.compile and bool(fb)
        self.compile_math = self.fused and fb == "compiled"
        # this Trainer's own choices, passed down (nothing process-wide): the activations' sign of its
        # layers and the kernel loss (all layers in one node on CUDA, else the per-layer reference)
        if self.compile_math:
            from .fast.compiled import compiled_sign
            from .layers import set_activation_sign

            set_activation_sign(self.model, compiled_sign())
        if on_cuda:
            from .fast.fused import kernel_loss_all_layers as kernel_loss
        else:
            from .losses import bayesian_kernel_loss as kernel_loss
        self.kernel_loss = kernel_loss
        if want_graph and not self.use_graph and log is not None and cfg.cuda_graph is True:
            log("[I] cuda_graph=true ignored: needs CUDA and a single process (not data-parallel)")
        if self.use_graph:
            # A captured step reads the learning rate from device memory: the scheduler fills these.
            for g in self.optimizer.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=device)
        self._lr_factors = [LrFactor(cfg.schedule, cfg.epochs, steps_per_epoch, cfg.lr_milestones, cfg.lr_gamma,
                                     cfg.warmup_epochs) for g in groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factors)
        self.scheduler.base_lrs = [_as_float(b) for b in self.scheduler.base_lrs]  # no per-step tensor math
        self.fmodel = torch.compile(self.model) if cfg.compile else self.model
        self._zero = torch.zeros((), device=device)
        self._graphs: dict[tuple, _CapturedStep] = {}
        self._graph_seen: dict[tuple, int] = {}
        self._side_stream = None  # the warm-up steps' stream, made on first use
        self.graph_warmup = 3
        self.graph_failed: str | None = None
        self.reset_sums()

    @torch.no_grad()
    def _init_momentum_buffers(self) -> None:
        """A zero momentum buffer for every parameter of a momentum group that has none.

        The same update as SGD's lazy ``buf = grad`` on a parameter's first step (dampening is 0), but
        the set of buffers no longer grows mid-training: fused SGD on CUDA cannot step a group in
        which some parameters have buffers and others not (the feature loss' ``log_var`` joins the
        ``slow`` group at ``feature_loss_start_epoch``), and a captured step needs them to exist.
        """
        if not isinstance(self.optimizer, torch.optim.SGD):
            return  # Adam's state is made on a parameter's first gradient (and skipped without one)
        for g in self.optimizer.param_groups:
            if g["momentum"] == 0 or g.get("dampening", 0) != 0:
                continue
            for p in g["params"]:
                st = self.optimizer.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p)

    # ------------------------------------------------------------------ per epoch
    def set_epoch(self, epoch: int) -> None:
        """``epoch`` is 0-based; switches the feature loss on at ``feature_loss_start_epoch``."""
        self.feature_on = (self.bonn and self.cfg.theta > 0 and epoch >= self.cfg.feature_loss_start_epoch)
        if self.feature_loss is not None:
            self.feature_loss.theta = self.cfg.theta if self.feature_on else 0.0

    def reset_sums(self) -> None:
        if getattr(self, "_sums", None) is None:
            self._sums = torch.zeros(4, device=self.device)       # loss, ce, kernel, feature (batch means)
            self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        else:  # in place: captured steps accumulate into these very tensors
            self._sums.zero_()
            self._correct.zero_()
        self._steps = 0
        self._seen = 0
        self.last_lr = self._current_lr()

    def _current_lr(self) -> float:
        """The scheduled base learning rate (``lr`` times the schedule factor), without reading device memory."""
        return self.cfg.lr * self._lr_factors[0](self.scheduler.last_epoch)

    def read_sums(self) -> dict[str, float]:
        """Epoch means so far (one host sync; under data parallelism one all-reduce, the same numbers on
        every worker: loss terms averaged over the workers' scaled slice losses = global-batch means)."""
        t = torch.cat([self._sums, self._correct.view(1).float(),
                       torch.tensor([float(self._seen)], device=self.device)])
        vals = self.dist.all_reduce_(t).tolist()
        n = max(self._steps, 1) * self.dist.world
        self.global_seen = int(round(vals[5]))
        return {"train_loss": vals[0] / n, "ce_loss": vals[1] / n, "kernel_loss": vals[2] / n,
                "feature_loss": vals[3] / n, "train_acc": vals[4] / max(vals[5], 1.0)}

    # ------------------------------------------------------------------ one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor, global_batch: int | None = None) -> None:
        """One optimiser step on ``(x, y)``; under data parallelism ``(x, y)`` is this worker's slice of a
        global batch of ``global_batch`` samples (see the module docstring).

        With ``use_graph`` the step (forward, losses, backward, optimiser, post-step clamps, metric
        sums) of each batch shape is run eagerly ``graph_warmup`` times on a side stream, then captured
        as a CUDA graph and replayed from then on; the batch is copied into the graph's input tensors.
        The scheduler runs on the host between replays and writes the learning rates into device
        tensors the graph reads. A capture that fails is logged once and training goes on eagerly.
        """
        scale = 1.0
        if self.dist.active:
            scale = float(y.shape[0]) * self.dist.world / float(global_batch or y.shape[0] * self.dist.world)
        if self.use_graph:
            self._graph_step(x, y)
        else:
            self._step(x, y, scale)
        self.last_lr = self._current_lr()
        self.scheduler.step()
        self._steps += 1
        self._seen += int(y.shape[0])

    def _step(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> None:
        """The device work of one step: everything but the scheduler (capturable: no host sync)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kl, fl = self._zero, self._zero
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=not self.use_graph):
            if self.fused:
                from .fast.fused import bonn_kernels_and_loss
                from .layers import precomputed_kernels

                kernels, kl = bonn_kernels_and_loss(self.layers, self.cfg.lam if self.kernel_on else 0.0,
                                                    self.cfg.nu,
                                                    torch.bfloat16 if self.amp else self.layers[0].weight.dtype,
                                                    compile_math=self.compile_math)
                with precomputed_kernels(self.layers, kernels):
                    feats, logits = self.fmodel(x)
            else:
                feats, logits = self.fmodel(x)
        ce = F.cross_entropy(logits.float(), y)
        if scale != 1.0:
            ce = ce * scale
        loss = ce
        if self.kernel_on:
            if not self.fused:
                kl = self.kernel_loss(self.layers, self.cfg.lam, self.cfg.nu)
            loss = loss + kl
        if self.feature_on:
            fl = self.feature_loss(feats.float(), y)
            if scale != 1.0:
                fl = fl * scale
            loss = loss + fl
        if not self.use_graph:
            self.zero_grad()
        loss.backward()
        if self.dist.active:
            self.dist.average_([p.grad for p in self.parameters() if p.grad is not None])
        self.optimizer.step()
        if self.center_optimizer is not None:
            self.center_optimizer.step()
        self._after_step()
        with torch.no_grad():
            self._sums += torch.stack([loss.detach(), ce.detach(), kl.detach(), fl.detach()])
            self._correct += (logits.detach().argmax(1) == y).sum()

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        key = (tuple(x.shape), x.dtype, tuple(y.shape), self.feature_on, self.kernel_on)
        cap = self._graphs.get(key)
        if cap is not None:
            cap.x.copy_(x)
            cap.y.copy_(y)
            cap.graph.replay()
            return
        seen = self._graph_seen.get(key, 0)
        if seen < self.graph_warmup:
            self._graph_seen[key] = seen + 1
            # Eager steps before a capture run on a side stream (lazy initialisation, cuDNN autotuning).
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.zero_grad()
                self._step(x, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        cap = _CapturedStep(x.clone(), y.clone(), torch.cuda.CUDAGraph())
        try:
            self.zero_grad()
            with torch.cuda.graph(cap.graph, capture_error_mode="thread_local"):
                self._step(cap.x, cap.y)
        except Exception as exc:  # noqa: BLE001 - fall back to eager steps, say so once
            self.graph_failed = f"{type(exc).__name__}: {exc}"
            if self.log is not None:
                self.log(f"[I] cuda_graph: capture failed, training eagerly ({self.graph_failed})")
            self.use_graph = False  # every later step is a plain eager one
            torch.cuda.synchronize(self.device)
            self._step(x, y)
            return
        self._graphs[key] = cap
        cap.graph.replay()  # the capture recorded the step on this batch; run it

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimisers hold (main optimiser first, then the centres)."""
        out = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.center_optimizer is not None:
            out += [p for g in self.center_optimizer.param_groups for p in g["params"]]
        return out

    def group_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group name (``latent``, ``decay``, ``no_decay``, ``slow``, ``centers``)."""
        out: dict[str, list[nn.Parameter]] = {}
        opts = [self.optimizer] + ([self.center_optimizer] if self.center_optimizer is not None else [])
        for opt in opts:
            for g in opt.param_groups:
                out.setdefault(g["name"], []).extend(g["params"])
        return out

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer is not None:
            self.center_optimizer.zero_grad(set_to_none=True)

    def invalidate_graphs(self) -> None:
        """Forget captured steps (after tensors they read were replaced, e.g. by load_state_dict)."""
        self._graphs.clear()
        self._graph_seen.clear()

    @torch.no_grad()
    def _after_step(self) -> None:
        if self.layers:
            from .losses import clamp_prior_, closed_form_mu_sigma_

            if self.cfg.mu_sigma_update == "closed_form":
                closed_form_mu_sigma_(self.layers)
            clamp_prior_(self.layers)
        if self.xnor_weights:
            torch._foreach_clamp_min_(self.xnor_weights, -1.0)
            torch._foreach_clamp_max_(self.xnor_weights, 1.0)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over ``batches``; one host sync. Under data parallelism each
        worker evaluates its slice of every batch and the sums are all-reduced."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        n = 0
        for x, y in batches:
            if self.dist.active:
                lo, hi = self.dist.slice_bounds(int(y.shape[0]))
                x, y = x[lo:hi], y[lo:hi]
                if hi <= lo:
                    continue
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                _, logits = self.fmodel(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            n += int(y.shape[0])
        self.model.train()
        t = torch.stack([loss_sum, correct.float(), torch.tensor(float(n), device=self.device)])
        loss, corr, n = self.dist.all_reduce_(t).tolist()
        return loss / max(n, 1), corr / max(n, 1)

    # ------------------------------------------------------------------ data parallelism
    def _state_tensors(self, buffers_only: bool = False) -> list[torch.Tensor]:
        mods = [self.model] + ([self.feature_loss] if self.feature_loss is not None else [])
        out: list[torch.Tensor] = []
        for m in mods:
            if not buffers_only:
                out += [p.data for p in m.parameters()]
            out += list(m.buffers())
        return out

    @torch.no_grad()
    def broadcast_state(self) -> None:
        """Parameters and buffers of rank 0 to every worker (start of a data-parallel training)."""
        self.dist.broadcast_(self._state_tensors())

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) over the workers."""
        self.dist.average_([b for b in self._state_tensors(buffers_only=True) if b.is_floating_point()])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs; learning rates as plain floats (device-independent files)."""
        opt = self.optimizer.state_dict()
        opt["param_groups"] = [{**g, "lr": _as_float(g["lr"])} for g in opt["param_groups"]]
        sched = {k: ([_as_float(v) for v in val] if k in ("base_lrs", "_last_lr") else val)
                 for k, val in self.scheduler.state_dict().items()}
        return {"model": self.model.state_dict(), "optimizer": opt, "scheduler": sched,
                "center_optimizer": (self.center_optimizer.state_dict() if self.center_optimizer is not None
                                     else None),
                "feature_loss": self.feature_loss.state_dict() if self.feature_loss is not None else None}

    @torch.no_grad()
    def parameters_finite(self) -> bool:
        """Whether every parameter the optimiser holds is finite (one pass, one host sync)."""
        norms = torch._foreach_norm(self.parameters())
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.center_optimizer is not None and sd.get("center_optimizer") is not None:
            self.center_optimizer.load_state_dict(sd["center_optimizer"])
        for g in self.optimizer.param_groups:  # lr storage of this run's mode (see __init__)
            lr = _as_float(g["lr"])
            g["lr"] = torch.tensor(lr, device=self.device) if self.use_graph else lr
        self._init_momentum_buffers()
        self.invalidate_graphs()  # optimiser state and lr tensors were replaced
        # The schedule (epochs, milestones, steps per epoch, warm-up) and the base lrs come from the
        # config, not the file: only the step counter is restored. ``LambdaLR.load_state_dict`` would
        # otherwise write the saved lambdas' attributes into ours.
        base_lrs = list(self.scheduler.base_lrs)
        sched = {k: v for k, v in sd["scheduler"].items() if k != "lr_lambdas"}
        self.scheduler.load_state_dict({**sched, "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
        self.scheduler.base_lrs = base_lrs
        if self.feature_loss is not None and sd.get("feature_loss") is not None:
            self.feature_loss.load_state_dict(sd["feature_loss"])


def _as_float(v: Any) -> Any:
    return float(v) if torch.is_tensor(v) else v


# ============================================================================ RNG and checkpoints
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
          "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any], data_gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    data_gen.set_state(st["data"])
    npst = st["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    random.setstate((st["python_version"], tuple(st["python"]), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_histogram(w, path: Path, epoch: int, title: str, log) -> None:
    """Fig.-3 histogram; a missing matplotlib costs the plot (with a warning), never the training."""
    try:
        save_weight_histogram(w, path, epoch, title=title)
    except ImportError as e:
        log(f"[warn] weight histogram of epoch {epoch} not written: {e}")


def _hist_name(epoch: int) -> str:
    return f"weights_hist_epoch{epoch:03d}.png"


def _remove_stale_histograms(folder: Path, keep: set[int]) -> None:
    for p in folder.glob("weights_hist_epoch*.png"):
        try:
            e = int(p.stem[len("weights_hist_epoch"):])
        except ValueError:
            continue
        if e not in keep:
            p.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model (CPU, eval mode) and its config dict from a ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    ck = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ck["config"])
    model = build_model(cfg, **ck["model_meta"])
    model.load_state_dict(ck["trainer"]["model"])
    model.eval()
    return model, ck["config"]


# ============================================================================ fit
def _log_choices(cfg: TrainConfig, data: DeviceData, device, amp, cl, log) -> None:
    log("[config] " + json.dumps(cfg.to_dict(), sort_keys=True))
    ms = milestone_epochs(cfg.lr_milestones, cfg.epochs)
    log(f"[I] model={cfg.model} width={cfg.width} block_style={cfg.block_style} shortcut={cfg.shortcut} "
        f"binarize={cfg.binarize}; FP: first conv, 1x1 shortcut convs, BN, PReLU, FC; "
        f"feature loss on the FC input (pooled penultimate feature)")
    log(f"[I] schedule={cfg.schedule} (step milestones at epochs {ms}, gamma {cfg.lr_gamma}), "
        f"warmup_epochs={cfg.warmup_epochs}; centers lr fixed at center_lr={cfg.center_lr}; "
        f"feature loss from epoch {cfg.feature_loss_start_epoch} (0-based); mu_sigma_update={cfg.mu_sigma_update}"
        f"; mu/sigma clamped positive after each step; xnor latent weights clipped to [-1, 1]")
    log(f"[I] data {data!r}; val split stratified, seed={cfg.seed}, val_fraction={cfg.val_fraction}; "
        f"normalisation mean={['%.4f' % m for m in data.mean]} std={['%.4f' % s for s in data.std]}")
    log(f"[I] device={device} amp(bf16)={amp} channels_last={cl} compile={cfg.compile} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}")


def fit(config: Mapping[str, Any] | TrainConfig, report: Callable[[dict], Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None, *, log: Callable[[str], None] | None = None
        ) -> dict[str, float]:
    """Train one trial; see docs/contracts.md. Returns the last epoch's metrics.

    Inside an initialised ``torch.distributed`` process group of W > 1 workers, every worker calls
    ``fit`` and the training is data-parallel (module docstring, "Data parallelism")."""
    log = log or (lambda s: print(s, flush=True))
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    dist = DistContext()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device, amp, cl = resolve_runtime(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _seed_everything(cfg.seed)
    data = DeviceData.from_config(cfg, device)
    if dist.active and min(cfg.batch_size, data.n_train) < dist.world:
        raise ConfigError("batch_size", f"must be >= the number of data-parallel workers ({dist.world}); "
                          "it is the global batch, split across the workers", cfg.batch_size)
    _log_choices(cfg, data, device, amp, cl, log)
    if dist.active:
        log(f"[I] data-parallel: rank {dist.rank} of {dist.world} ({dist.backend}); global batch "
            f"{min(cfg.batch_size, data.n_train)} split across the workers")
    model = build_model(cfg, data.in_channels, data.num_classes, data.image_size)
    trainer = Trainer(cfg, model, data.num_classes, device, data.steps_per_epoch(cfg.batch_size), amp, cl, log,
                      dist=dist)
    data_gen = torch.Generator(device=device)
    data_gen.manual_seed(cfg.seed)

    # only rank 0 reads and writes checkpoints; the others get its state by broadcast
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None and dist.rank == 0 else None
    ckpath = ckdir / CHECKPOINT_NAME if ckdir is not None else None
    start, best, history = 0, {"val_acc": -1.0, "epoch": 0}, []
    ck = load_checkpoint(ckpath) if ckpath is not None and ckpath.exists() else None  # CPU: RNG states stay CPU
    if dist.active:
        ck = dist.broadcast_object(ck, device)
    if ck is not None:
        differs = sorted(k for k, v in ck["config"].items() if cfg.to_dict().get(k) != v)
        if differs:
            log(f"[resume] warning: config differs from the checkpoint's in {differs}")
        trainer.load_state_dict(ck["trainer"])
        _set_rng_state(ck["rng"], data_gen)
        start, best, history = int(ck["epoch"]), dict(ck["best"]), list(ck["history"])
        log(f"[resume] from {ckpath or 'rank 0'} at epoch {start}")
        if start >= cfg.epochs and history:
            return dict(history[-1])
    if dist.active:
        trainer.broadcast_state()
    dynamics = Dynamics(trainer.model, trainer.group_parameters(),
                        state=ck.get("dynamics") if ck is not None else None)
    if ck is None and ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
        if 0 in cfg.hist_epochs:
            w0 = first_binary_weights(trainer.model)
            if w0 is not None:
                _write_histogram(w0, ckdir / _hist_name(0), 0, f"{cfg.model}/{cfg.binarize}", log)

    metrics: dict[str, float] = dict(history[-1]) if history else {}
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        trainer.set_epoch(epoch)
        trainer.reset_sums()
        dynamics.start_epoch()
        global_batch = min(cfg.batch_size, data.n_train)
        for x, y in data.train_batches(cfg.batch_size, data_gen, shard=dist.shard()):
            trainer.train_step(x, y, global_batch)
        sums = trainer.read_sums()  # the sync that ends the training loop
        t_train = time.perf_counter() - t0
        if not all(math.isfinite(v) for v in sums.values()):
            raise TrainingDiverged(f"non-finite training loss in epoch {epoch + 1}: "
                                   + ", ".join(f"{k}={v}" for k, v in sums.items()))
        if dist.active:
            t_train = dist.all_reduce_(torch.tensor([t_train], device=device), op="max").item()
            trainer.sync_buffers()
        val_loss, val_acc = trainer.evaluate(data.eval_batches("val", EVAL_BATCH))
        if not math.isfinite(val_loss) or not trainer.parameters_finite():
            # the last step of the epoch can make the weights non-finite after finite losses:
            # never write (or report) such a checkpoint, a resume would start from it
            raise TrainingDiverged(f"non-finite parameters or validation loss after epoch {epoch + 1} "
                                   f"(val_loss={val_loss})")
        w = first_binary_weights(trainer.model)
        metrics = {"epoch": epoch + 1, **sums, "val_acc": val_acc, "val_loss": val_loss,
                   "images_per_s": (trainer.global_seen if dist.active else trainer._seen) / t_train,
                   "bimodality": bimodality_coefficient(w) if w is not None else float("nan"),
                   "lr": trainer.last_lr, **dynamics.end_epoch()}
        if epoch + 1 == cfg.epochs:
            metrics["test_loss"], metrics["test_acc"] = trainer.evaluate(data.eval_batches("test", EVAL_BATCH))
        metrics["epoch_time_s"] = time.perf_counter() - t0
        if dist.active:
            metrics["epoch_time_s"] = dist.all_reduce_(torch.tensor([metrics["epoch_time_s"]], device=device),
                                                       op="max").item()
            metrics["world_size"] = dist.world
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch + 1}
        history.append(metrics)
        if ckdir is not None:
            keep = {epoch + 1} | ({0} if epoch == start == 0 else set())
            _remove_stale_histograms(ckdir, keep)
            if epoch + 1 in cfg.hist_epochs and w is not None:
                _write_histogram(w, ckdir / _hist_name(epoch + 1), epoch + 1, f"{cfg.model}/{cfg.binarize}", log)
            _atomic_save({"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model_meta": model.model_meta,
                          "epoch": epoch + 1, "trainer": trainer.state_dict(), "rng": _rng_state(data_gen),
                          "best": best, "history": history, "dynamics": dynamics.state_dict()}, ckpath)
        log("[epoch] " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        if report is not None:
            report(dict(metrics))
    return dict(metrics)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"
