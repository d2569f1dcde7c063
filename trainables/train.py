"""``fit(config)``: the ``Trainer`` (one training step, evaluation, state) and the epoch loop.

Reads as chapters, each in its own module: the learning-rate schedule (``trainables.schedule``),
parameter groups and optimisers (``trainables.optim``), data parallelism (``trainables.distributed``),
checkpoints and RNG states (``trainables.checkpoint``), the fast path of the step
(``trainables.fast``: all BONN layers in one autograd node, compiled math, the CUDA-graph capture);
here the ``Trainer`` and ``fit``. The interface is pinned in docs/contracts.md.

Loss (Eq. 10): ``L = CE + L_K + L_F`` with the Bayesian kernel loss ``L_K``
(``trainables.losses.bayesian_kernel_loss``, weight ``lam``) over every ``BonnConv2d`` and the
Bayesian feature loss ``L_F`` (``BayesianFeatureLoss``, weight ``theta``) on the FC input. Both exist
only for ``binarize="bonn"``; ``xnor`` and ``none`` train with cross-entropy alone. ``L_F`` is
switched on at epoch ``feature_loss_start_epoch`` (0-based; before it, it is not computed and logged
as 0), and skipped entirely when ``theta == 0``; ``L_K`` is skipped when ``lam == 0``.

After every optimiser step: ``mu_sigma_update="closed_form"`` sets ``mu``/``sigma`` to their exact
minimisers (``closed_form_mu_sigma_``); ``mu``, ``sigma`` are then clamped positive (``clamp_prior_``).
``xnor`` clips its latent weights to [-1, 1] (larq ``WeightClip``; BONN does not call for a clip, its
STE mask ``|w X| <= 1`` already starves weights outside).

Runtime: on CUDA, bf16 autocast (``amp``) and channels_last (``channels_last``) by default, optional
``torch.compile`` of the model. Also on CUDA by default: ``fused_bonn`` (every BONN layer's binary
kernel and the kernel loss in one autograd node, ``trainables.fast.fused``; same values and gradients
as the per-layer reference; ``compiled``: its math and this Trainer's activation sign torch.compile'd)
and ``cuda_graph`` (the whole step captured as a CUDA graph per batch shape and feature-loss state
after 3 eager warm-up steps, then replayed; the scheduler writes the learning rates into device
tensors the graph reads; not with data parallelism). These choices belong to one ``Trainer`` and are
passed down to its own model and calls: two Trainers in one process do not interfere. Loss sums and
correct counts are accumulated on the device and read once per epoch (one host sync per epoch in the
training loop); a non-finite epoch loss raises ``TrainingDiverged`` then. ``images_per_s`` = training
images / wall time of the training loop.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CHECKPOINT_NAME, hist_name, load_checkpoint, remove_stale_histograms, save_checkpoint,
                         seed_everything, set_rng_state, write_histogram)
from .config import ConfigError, TrainConfig
from .data import DeviceData
from .distributed import DistContext
from .dynamics import Dynamics
from .fast.compiled import compiled_sign
from .fast.cuda_graph import CapturedSteps
from .fast.fused import bonn_kernels_and_loss, kernel_loss_all_layers
from .layers import bonn_layers, precomputed_kernels, set_activation_sign
from .losses import BayesianFeatureLoss, bayesian_kernel_loss, clamp_prior_, closed_form_mu_sigma_
from .metrics import bimodality_coefficient, first_binary_weights
from .models import build_model
from .optim import init_momentum_buffers, make_optimizers
from .schedule import as_float, load_scheduler_state, make_scheduler, milestone_epochs, scheduler_state

__all__ = ["fit", "TrainingDiverged", "Trainer", "METRIC_KEYS", "resolve_runtime"]

METRIC_KEYS = ("epoch", "train_loss", "ce_loss", "kernel_loss", "feature_loss", "train_acc", "val_acc",
               "val_loss", "images_per_s", "bimodality", "lr", "epoch_time_s", "flip_frac", "flip_frac_init",
               "latent_abs_mean")
EVAL_BATCH = 1024


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


# ============================================================================ runtime
def resolve_runtime(cfg: TrainConfig) -> tuple[torch.device, bool, bool]:
    """``(device, bf16 autocast, channels_last)`` of ``cfg`` on this machine (``auto``: on for CUDA)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but torch.cuda.is_available() is false", cfg.device)
    dev = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    amp = (dev.type == "cuda") if cfg.amp == "auto" else bool(cfg.amp)
    cl = (dev.type == "cuda") if cfg.channels_last == "auto" else bool(cfg.channels_last)
    return dev, amp, cl


#: What ``fused_bonn: auto`` means on CUDA (on CPU it means false).
FUSED_BONN_AUTO_CUDA: bool | str = "compiled"


# ============================================================================ trainer
class Trainer:
    """Model, losses, optimiser and schedule of one training; ``train_step`` is the whole step."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, num_classes: int, device: torch.device,
                 steps_per_epoch: int, amp: bool = False, channels_last: bool = False,
                 log: Callable[[str], None] | None = print, dist: DistContext | None = None):
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
            self.feature_loss = BayesianFeatureLoss(num_classes, model.feature_dim, cfg.theta,
                                                    cfg.center_lr).to(device)
        self.kernel_on = self.bonn and cfg.lam > 0
        self.sigma_floor = cfg.sigma_floor()  # the prior's sigma stays >= this after each step
        self.feature_on = False  # switched per epoch by set_epoch
        self.xnor_weights = ([m.weight for m in self.model.modules() if getattr(m, "_backbone_conv", False)]
                             if cfg.binarize == "xnor" else [])
        on_cuda = device.type == "cuda"
        want_graph = on_cuda if cfg.cuda_graph == "auto" else bool(cfg.cuda_graph)
        self.use_graph = want_graph and on_cuda and not self.dist.active
        self.optimizer, self.center_optimizer = make_optimizers(self.model, self.feature_loss, cfg, device,
                                                                capturable=self.use_graph, log=log)
        self.steps_per_epoch = steps_per_epoch
        # Runtime choices (docs/contracts.md): one autograd node for all BONN layers' kernels and
        # kernel loss (trainables.fast.fused), and the whole step captured as a CUDA graph.
        fb = cfg.fused_bonn if cfg.fused_bonn != "auto" else (FUSED_BONN_AUTO_CUDA if on_cuda else False)
        self.fused = self.bonn and not cfg.compile and bool(fb)
        self.compile_math = self.fused and fb == "compiled"
        # this Trainer's own choices, passed down (nothing process-wide): the activations' sign of its
        # layers and the kernel loss (all layers in one node on CUDA, else the per-layer reference)
        if self.compile_math:
            set_activation_sign(self.model, compiled_sign())
        self.kernel_loss = kernel_loss_all_layers if on_cuda else bayesian_kernel_loss
        if want_graph and not self.use_graph and log is not None and cfg.cuda_graph is True:
            log("[I] cuda_graph=true ignored: needs CUDA and a single process (not data-parallel)")
        if self.use_graph:
            # A captured step reads the learning rate from device memory: the scheduler fills these.
            for g in self.optimizer.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=device)
        self.scheduler = make_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.fmodel = torch.compile(self.model) if cfg.compile else self.model
        self._zero = torch.zeros((), device=device)
        self.captured = CapturedSteps(device, log, warmup=3)
        self.reset_sums()

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
        self._last_step = self.scheduler.last_epoch

    @property
    def last_lr(self) -> float:
        """The scheduled base learning rate (``lr`` times the schedule factor) of the last step taken,
        without reading device memory; evaluated when asked (once per epoch), not every step."""
        return self.cfg.lr * self.scheduler.lr_lambdas[0](self._last_step)

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
        global batch of ``global_batch`` samples (``trainables.distributed``).

        With ``use_graph`` the step (forward, losses, backward, optimiser, post-step clamps, metric
        sums) of each batch shape is run eagerly ``captured.warmup`` times on a side stream, then
        captured as a CUDA graph and replayed from then on (``trainables.fast.cuda_graph``). The
        scheduler runs on the host between replays and writes the learning rates into device tensors
        the graph reads. A capture that fails is logged once and training goes on eagerly.
        """
        scale = 1.0
        if self.dist.active:
            scale = float(y.shape[0]) * self.dist.world / float(global_batch or y.shape[0] * self.dist.world)
        if self.use_graph:
            key = (tuple(x.shape), x.dtype, tuple(y.shape), self.feature_on, self.kernel_on)
            if not self.captured.run(key, x, y, self._step, self.zero_grad):
                self.use_graph = False  # the capture failed: this and every later step is a plain eager one
                self._step(x, y)
        else:
            self._step(x, y, scale)
        self._last_step = self.scheduler.last_epoch
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
                kernels, kl = bonn_kernels_and_loss(self.layers, self.cfg.lam if self.kernel_on else 0.0,
                                                    self.cfg.nu,
                                                    torch.bfloat16 if self.amp else self.layers[0].weight.dtype,
                                                    compile_math=self.compile_math, ste_clip=self.cfg.ste_clip)
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

    @torch.no_grad()
    def _after_step(self) -> None:
        if self.layers:
            if self.cfg.mu_sigma_update == "closed_form":
                closed_form_mu_sigma_(self.layers, sigma_min=self.sigma_floor)
            clamp_prior_(self.layers, sigma_min=self.sigma_floor)
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
        opt["param_groups"] = [{**g, "lr": as_float(g["lr"])} for g in opt["param_groups"]]
        return {"model": self.model.state_dict(), "optimizer": opt, "scheduler": scheduler_state(self.scheduler),
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
            lr = as_float(g["lr"])
            g["lr"] = torch.tensor(lr, device=self.device) if self.use_graph else lr
        init_momentum_buffers(self.optimizer)
        self.captured.clear()  # optimiser state and lr tensors were replaced
        load_scheduler_state(self.scheduler, sd["scheduler"])  # the step counter; the schedule is the config's
        if self.feature_loss is not None and sd.get("feature_loss") is not None:
            self.feature_loss.load_state_dict(sd["feature_loss"])


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
        f"; after each step mu >= 1e-8 and sigma >= {cfg.sigma_floor():.3g} (sigma_min={cfg.sigma_min})"
        f"; xnor latent weights clipped to [-1, 1]")
    log(f"[I] data {data!r}; val split stratified, seed={cfg.seed}, val_fraction={cfg.val_fraction}; "
        f"normalisation mean={['%.4f' % m for m in data.mean]} std={['%.4f' % s for s in data.std]}")
    log(f"[I] device={device} amp(bf16)={amp} channels_last={cl} compile={cfg.compile} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}")


def fit(config: Mapping[str, Any] | TrainConfig, report: Callable[[dict], Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None, *, log: Callable[[str], None] | None = None
        ) -> dict[str, float]:
    """Train one trial; see docs/contracts.md. Returns the last epoch's metrics.

    Inside an initialised ``torch.distributed`` process group of W > 1 workers, every worker calls
    ``fit`` and the training is data-parallel (``trainables.distributed``)."""
    # -------- 1. runtime, data, model, Trainer
    log = log or (lambda s: print(s, flush=True))
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    dist = DistContext()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device, amp, cl = resolve_runtime(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed)
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

    # -------- 2. resume (trainables.checkpoint): only rank 0 reads and writes checkpoints; the others
    # get its state by broadcast
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
        set_rng_state(ck["rng"], data_gen)
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
                write_histogram(w0, ckdir / hist_name(0), 0, f"{cfg.model}/{cfg.binarize}", log)

    # -------- 3. epochs: train, check, evaluate, metrics, checkpoint, report
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
            remove_stale_histograms(ckdir, keep)
            if epoch + 1 in cfg.hist_epochs and w is not None:
                write_histogram(w, ckdir / hist_name(epoch + 1), epoch + 1, f"{cfg.model}/{cfg.binarize}", log)
            save_checkpoint(ckpath, cfg, model.model_meta, epoch + 1, trainer.state_dict(), data_gen, best, history,
                            dynamics.state_dict())
        log("[epoch] " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        if report is not None:
            report(dict(metrics))
    return dict(metrics)


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"
