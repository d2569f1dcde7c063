"""BONN's Bayesian losses: the kernel loss (weight lambda) and the feature loss (weight theta).

Reference: Gu et al., "Bayesian Optimized 1-Bit CNNs", ICCV 2019 (arXiv 1908.06314); the specification
is docs/bonn-method.md (sections 2-4 and 9). Layers are anything with ``weight`` (latent kernels X,
``(C_out, C_in, k, k)``), ``w`` (``(k, k)`` or ``(C_in, k, k)``), ``mu`` and ``sigma`` (``(C_out,)``),
normally :class:`trainables.layers.BonnConv2d`.

Kernel loss, per layer with ``K = C_in k k`` elements per output filter ``i``, ``s = sign(X)``
(``sign(0) = +1``), ``|X| := s X``, ``X_hat = mean(w) s`` treated as a constant, ``d = |X| - mu_i``::

    L_K = lam/2 * sum_l [ sum ||X_hat - w*X||^2                                  (reconstruction)
                          + nu * sum_i sigma_i^-2 sum_k d^2                      (drives X)
                          + nu * sum_i ( sigma_i^-2 mean_k d^2 + log sigma_i^2 ) ] (drives mu, sigma)

This is the optimisation objective of docs/bonn-method.md section 2.4: its autograd gradients are
exactly the paper's printed gradients (listed, with their equation numbers, in the docstring of
:func:`bayesian_kernel_loss`): per element for X, averaged over the K elements of a filter for mu and
sigma. Its *value* therefore differs from the paper's full objective (which has ``nu K log sigma_i^2``
and no 1/K terms); :func:`kernel_loss_value` computes that one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from .binarize import sign
from .flat_layout import flat_kernels, layer_plan, per_filter_sum, unflat_filters

__all__ = [
    "BayesianFeatureLoss",
    "as_layers",
    "bayesian_kernel_loss",
    "clamp_prior_",
    "closed_form_mu_sigma_",
    "kernel_loss_value",
]


# --------------------------------------------------------------------------------------------------
# Layer lists
# --------------------------------------------------------------------------------------------------


def as_layers(layers: Any) -> list:
    """One layer, an iterable of layers, or a module containing ``BonnConv2d`` layers -> list."""
    if all(hasattr(layers, a) for a in ("weight", "w", "mu", "sigma")):
        return [layers]
    if isinstance(layers, nn.Module):
        from .layers import bonn_layers

        return bonn_layers(layers)
    if isinstance(layers, Iterable):
        return list(layers)
    raise TypeError(f"layers: expected a BONN layer, an iterable of them or a module (got {type(layers).__name__})")


# --------------------------------------------------------------------------------------------------
# Bayesian kernel loss
# --------------------------------------------------------------------------------------------------


def _kernel_loss_layerwise(layers: list, lam: float, nu: float) -> torch.Tensor:
    """Reference implementation (docs/bonn-method.md section 2.4), plain autograd, one layer at a time."""
    total = None
    for m in layers:
        X, w, mu, sigma = m.weight, m.w, m.mu, m.sigma
        K = X[0].numel()
        s = sign(X.detach())
        Xhat = w.detach().mean() * s
        recon = ((Xhat - w * X) ** 2).sum()
        mm = mu.view(-1, *([1] * (X.dim() - 1)))
        s2 = (sigma * sigma).view_as(mm)
        gmm_x = ((s * X - mm.detach()) ** 2 / s2.detach()).sum()
        dev2 = (s * X.detach() - mm) ** 2
        gmm_ms = ((dev2 / s2).flatten(1).sum(1) / K + torch.log(s2.reshape(-1))).sum()
        term = 0.5 * lam * (recon + nu * (gmm_x + gmm_ms))
        total = term if total is None else total + term
    return total


def bayesian_kernel_loss(layers: Any, lam: float, nu: float) -> torch.Tensor:
    """Bayesian kernel loss ``L_K`` of BONN (kernel part of the full objective) summed over ``layers``.

    ``layers``: one BONN layer, an iterable of them, or a module (its ``BonnConv2d`` layers are used).
    ``lam`` = lambda, ``nu`` = nu (Python floats). Returns a 0-dim tensor (no host sync). With no
    layers, or ``lam == 0``, returns a zero that carries no graph.

    With ``s = sign(X)`` (``sign(0) = +1``), ``X_hat = mean(w) s`` (constant inside L_K),
    ``d = s X - mu_i`` and ``K = C_in k k``, the autograd gradients of the returned scalar are:

    * BONN Eq. 13: ``dL_K/dX = lam * ( w * (w*X - X_hat) + nu sigma_i^-2 d s )``, i.e.
      ``nu sigma_i^-2 (X - mu_i)`` for ``X >= 0`` and ``nu sigma_i^-2 (X + mu_i)`` for ``X < 0``.
    * BONN Eq. 16: ``dL_K/dw = lam * sum_i (w*X_i - X_hat_i) * X_i`` (summed over all kernels, reduced
      to ``w``'s shape).
    * BONN Eq. 17: ``dL_K/dmu_i = (lam nu / K) sum_k sigma_i^-2 (mu_i - |X_ik|)``.
    * BONN Eq. 18: ``dL_K/dsigma_i = (lam nu / K) sum_k ( -sigma_i^-3 (|X_ik| - mu_i)^2 + sigma_i^-1 )``.

    The value is the section 2.4 objective, not the paper's objective verbatim (see the module docstring
    and :func:`kernel_loss_value`). This is the plain-autograd, layer-by-layer reference of section 2.4
    (what torch.compile should trace, and faster on CPU). ``trainables.fast.fused.kernel_loss_all_layers``
    evaluates the same value and gradients (to rounding) for every layer in one autograd node with a
    fixed number of kernels (for eager mode on GPUs; the ``Trainer`` picks it on CUDA).
    """
    ls = as_layers(layers)
    if not ls:
        return torch.zeros(())
    if lam == 0:
        return ls[0].weight.new_zeros(())
    return _kernel_loss_layerwise(ls, float(lam), float(nu))


@torch.no_grad()
def kernel_loss_value(layers: Any, lam: float, nu: float) -> torch.Tensor:
    """The kernel part of BONN Eq. 9 itself, for logging: a 0-dim tensor, no graph, no host sync.

    ``lam/2 * sum_l sum_i [ ||X_hat_i - w*X_i||^2 + nu sigma_i^-2 sum_k (|X_ik| - mu_i)^2
    + nu K log sigma_i^2 ]`` (the two-mode GMM terms in the compact form of bonn-method.md section 2.3,
    with the per-kernel log-det implied by the paper's sigma gradient). It differs from the value of
    :func:`bayesian_kernel_loss`, whose mu/sigma part is divided by K so that its gradients match the
    paper's mu/sigma gradients.
    """
    ls = as_layers(layers)
    total = torch.zeros((), device=ls[0].weight.device, dtype=ls[0].weight.dtype) if ls else torch.zeros(())
    for m in ls:
        X, w, mu, sigma = m.weight, m.w, m.mu, m.sigma
        K = X[0].numel()
        s = sign(X)
        recon = ((w.mean() * s - w * X) ** 2).sum()
        s2 = sigma * sigma
        dev2 = ((s * X).flatten(1) - mu[:, None]).pow(2).sum(1)
        total = total + 0.5 * lam * (recon + nu * (dev2 / s2 + K * torch.log(s2)).sum())
    return total


@torch.no_grad()
def closed_form_mu_sigma_(layers: Any, eps: float = 1e-8, sigma_min: float | None = None) -> None:
    """Set ``mu``/``sigma`` to the exact minimisers of the kernel loss, in place ([I], section 2.3).

    ``mu_i = mean_k |X_ik|``, ``sigma_i = sqrt(mean_k (|X_ik| - mu_i)^2)`` clamped to ``>= sigma_min``
    (default ``eps``).
    Used when ``mu_sigma_update == "closed_form"`` (after each optimizer step). All layers at once, over
    the flat layout of ``trainables.flat_layout``.
    """
    ls = as_layers(layers)
    if not ls:
        return
    plan = layer_plan(ls)
    a = flat_kernels([m.weight for m in ls], plan).abs()
    mu = per_filter_sum(a, plan).mul_(plan.inv_filter_numel)
    d = a - mu.index_select(0, plan.filter_index)
    sig = per_filter_sum(d * d, plan).mul_(plan.inv_filter_numel).sqrt_().clamp_min_(
        eps if sigma_min is None else sigma_min)
    torch._foreach_copy_([m.mu for m in ls], unflat_filters(mu, plan))
    torch._foreach_copy_([m.sigma for m in ls], unflat_filters(sig, plan))


@torch.no_grad()
def clamp_prior_(layers: Any, eps: float = 1e-8, sigma_min: float | None = None) -> None:
    """Keep every ``mu >= eps`` and ``sigma >= sigma_min`` (default ``eps``) in place (multi-tensor ops)."""
    ls = as_layers(layers)
    if not ls:
        return
    if sigma_min is None or sigma_min == eps:
        torch._foreach_clamp_min_([m.mu for m in ls] + [m.sigma for m in ls], eps)
    else:
        torch._foreach_clamp_min_([m.mu for m in ls], eps)
        torch._foreach_clamp_min_([m.sigma for m in ls], sigma_min)


# --------------------------------------------------------------------------------------------------
# Bayesian feature loss
# --------------------------------------------------------------------------------------------------


class _CenterLossGather(torch.autograd.Function):
    """``c_y = centers[labels]`` whose backward hands ``centers`` the center-loss update direction.

    Forward: ``c_{y_i}`` for each sample. Backward (ignores the incoming gradient): the gradient of
    ``centers`` is ``delta_c_j = sum_{i: y_i = j} (c_j - f_i) / (1 + n_j)`` with ``n_j`` the number of
    samples of class ``j`` in the batch (Wen et al., ECCV 2016, the center loss; BONN updates c_m "using
    the same strategy as the center loss"). An SGD group with ``lr = alpha``, no momentum and no weight
    decay then performs ``c_j <- c_j - alpha delta_c_j`` exactly. Features and labels get no gradient
    here (features get their true gradient through the loss expression instead).
    """

    @staticmethod
    def forward(ctx, centers: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c_y = centers.index_select(0, labels)
        ctx.save_for_backward(c_y, features, labels)
        ctx.num_classes = centers.shape[0]
        return c_y

    @staticmethod
    def backward(ctx, _g: torch.Tensor):
        c_y, features, labels = ctx.saved_tensors
        M = ctx.num_classes
        diff = c_y - features.to(c_y.dtype)
        # index_put_(accumulate=True): no host sync, deterministic under torch.use_deterministic_algorithms.
        num = diff.new_zeros((M, diff.shape[1])).index_put_((labels,), diff, accumulate=True)
        cnt = diff.new_zeros((M,)).index_put_((labels,), diff.new_ones(labels.shape), accumulate=True)
        return num / (1.0 + cnt)[:, None], None, None


class BayesianFeatureLoss(nn.Module):
    """Bayesian feature loss ``L_F`` of BONN, computed on the input of the final FC layer.

    ``centers`` = class centres ``c_m`` and ``log_var`` = ``log sigma_m^2``, both ``(num_classes, dim)``
    parameters, initialised to 0 (centres at the origin, unit variances) [I]. For features ``f``
    ``(B, dim)`` and labels ``y`` ``(B,)`` the forward value is

        BONN Eq. 8 (feature part of the full objective), averaged over the batch [I: the paper sums
        over classes]:
        ``theta/2 * mean_i [ ||f_i - c_{y_i}||^2
                             + sum_k ( (f_ik - c_{y_i,k})^2 / sigma^2_{y_i,k} + log sigma^2_{y_i,k} ) ]``.

    Updates:

    * features: the true gradient ``theta/B (f_i - c_{y_i}) (1 + sigma^-2_{y_i})``;
    * ``log_var``: the plain gradient ``theta/(2B) sum_{i: y_i=m} (1 - (f_ik - c_mk)^2 / sigma^2_mk)``;
    * ``centers``: the center-loss rule — their ``.grad`` is ``sum_{i:y_i=j}(c_j - f_i)/(1+n_j)``,
      independent of ``theta``, of the batch size and of the gradient flowing in (see
      :class:`_CenterLossGather`). Put ``centers`` in their own SGD group with ``lr=center_lr``,
      ``momentum=0``, ``weight_decay=0`` (:meth:`param_groups`).

    ``theta`` is a plain float attribute that may be changed at any time (e.g. 0 until the epoch at
    which the feature loss is switched on); it is saved in ``state_dict`` (extra state), as is
    ``center_lr``. Computation runs in float32 (features are cast to the parameters' dtype), so it is
    safe under autocast.
    """

    def __init__(self, num_classes: int, dim: int, theta: float, center_lr: float = 0.5) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.theta = float(theta)
        self.center_lr = float(center_lr)
        self.centers = nn.Parameter(torch.zeros(self.num_classes, self.dim))
        self.log_var = nn.Parameter(torch.zeros(self.num_classes, self.dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = features.to(self.centers.dtype)
        labels = labels.long()
        c = _CenterLossGather.apply(self.centers, f.detach(), labels)
        lv = self.log_var.index_select(0, labels)
        d2 = (f - c).square()
        per_sample = (d2 + d2 * torch.exp(-lv) + lv).sum(1)
        return (0.5 * self.theta) * per_sample.mean()

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: centres (``center_lr``, plain SGD step) and ``log_var`` (``lr``); no decay."""
        return [
            {"params": [self.centers], "lr": self.center_lr, "momentum": 0.0, "weight_decay": 0.0,
             "dampening": 0.0, "nesterov": False, "name": "feature_centers"},
            {"params": [self.log_var], "lr": lr, "weight_decay": 0.0, "name": "feature_log_var"},
        ]

    def get_extra_state(self) -> dict:
        return {"theta": self.theta, "center_lr": self.center_lr}

    def set_extra_state(self, state: dict) -> None:
        self.theta = float(state["theta"])
        self.center_lr = float(state["center_lr"])

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, theta={self.theta}, center_lr={self.center_lr}"
