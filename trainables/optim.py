"""Parameter groups and optimisers of ``fit`` (Alg. 1 line 13; docs/bonn-method.md section 4).

``optimizer`` = ``sgd`` (the paper's; ``momentum``, nesterov off), ``adam`` (L2 weight decay added to
the gradient) or ``adamw`` (decoupled weight decay; ``adam_beta2``, beta1 = ``momentum``); five
groups, printed with their counts at start:

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
the second optimiser of :func:`make_optimizers`), whatever ``optimizer`` the other groups use; the lr
schedule (``trainables.schedule``) scales the main optimiser's groups only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .config import TrainConfig
from .layers import bonn_layers

__all__ = ["GROUP_NAMES", "build_param_groups", "init_momentum_buffers", "make_optimizer", "make_optimizers"]

GROUP_NAMES = ("latent", "decay", "no_decay", "slow", "centers")


def build_param_groups(model: nn.Module, feature_loss: nn.Module | None, cfg: TrainConfig,
                       log: Callable[[str], None] | None = print) -> list[dict]:
    """Explicit groups (see the module docstring); prints each group with its counts."""
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


def make_optimizers(model: nn.Module, feature_loss: nn.Module | None, cfg: TrainConfig, device: torch.device,
                    capturable: bool, log: Callable[[str], None] | None = print
                    ) -> tuple[torch.optim.Optimizer, torch.optim.SGD | None]:
    """``(main optimiser over every group but the centres, the centres' plain SGD step or None)``; every
    momentum parameter of the main optimiser gets its buffer now (:func:`init_momentum_buffers`)."""
    groups = build_param_groups(model, feature_loss, cfg, log=log)
    center_groups = [g for g in groups if g["name"] == "centers"]
    groups = [g for g in groups if g["name"] != "centers"]
    optimizer = make_optimizer(groups, cfg, device, capturable=capturable)
    # the centre update of the center loss is its own plain SGD step (lr alpha, no momentum)
    center_optimizer = torch.optim.SGD(center_groups, lr=cfg.center_lr, momentum=0.0) if center_groups else None
    init_momentum_buffers(optimizer)
    return optimizer, center_optimizer


@torch.no_grad()
def init_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """A zero momentum buffer for every parameter of a momentum group that has none.

    The same update as SGD's lazy ``buf = grad`` on a parameter's first step (dampening is 0), but
    the set of buffers no longer grows mid-training: fused SGD on CUDA cannot step a group in
    which some parameters have buffers and others not (the feature loss' ``log_var`` joins the
    ``slow`` group at ``feature_loss_start_epoch``), and a captured step needs them to exist.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return  # Adam's state is made on a parameter's first gradient (and skipped without one)
    for g in optimizer.param_groups:
        if g["momentum"] == 0 or g.get("dampening", 0) != 0:
            continue
        for p in g["params"]:
            st = optimizer.state[p]
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.zeros_like(p)
