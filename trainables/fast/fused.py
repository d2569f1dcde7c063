"""All BONN layers at once: one pass over the latent weights per training step.

This module holds no formula of its own. It evaluates, for every ``BonnConv2d`` of a model together,

* the forward kernel and the backward rule of :class:`trainables.binarize.BonnWeightBinarize`
  (``X_hat = mean(w) sign(X)``; ``dL/dX = G 1{|wX| <= 1} w``, ``dL/dw = sum over kernels of
  G 1{|wX| <= 1} X``), and
* the value and the gradients of :func:`trainables.losses.bayesian_kernel_loss` (its docstring lists
  them with the paper's equation numbers; the lines below that compute one carry a ``# Eq. N`` label),

over one flat vector made of all layers' kernels (layout: ``trainables.flat_layout``), so a step costs
a fixed number of GPU kernels (about 40) instead of ~25 small ones per layer, and the gradient of each
latent kernel from the binarizer and from the kernel loss is summed in the same elementwise pass (no
per-layer gradient accumulation). Both reference implementations stay the specification:
``tests/unit/test_fused.py`` compares one training step's gradients of every parameter against them,
in float32 and under bf16 autocast. Nothing needs a host sync or atomics (deterministic), so the whole
step can be captured in a CUDA graph.

Names follow the paper: ``X`` latent kernels, ``w`` modulation, ``mu``/``sigma`` the per-filter prior,
``lam``/``nu`` the loss weights; a name ending in ``_x`` is a per-filter or per-layer quantity broadcast
to every kernel element (``mu_x`` is ``mu_i`` at each element of filter ``i``); ``filter_sum_*`` are
sums over the ``K = C_in k k`` elements of each filter. Settings (compiled math, the STE bound) are
passed per call, never stored on the shared plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..binarize import clipped_grad, sign
from ..flat_layout import (FlatPlan, cat, flat_kernels, layer_plan, per_filter_sum, per_layer_mean,
                           per_position_sum, unflat_filters, unflat_kernels)
from ..losses import as_layers
from .compiled import SafeCompiled

__all__ = ["bonn_kernels_and_loss", "kernel_loss_all_layers"]


@dataclass(frozen=True)
class _Options:
    """The per-call settings of :class:`_BonnAllLayers` (static: part of the compiled-math cache key)."""

    lam: float
    nu: float
    out_dtype: torch.dtype  # dtype of the emitted kernels
    emit: bool  # return the forward kernels (else only the loss)
    compile_math: bool  # run the flat math torch.compile'd
    ste_clip: float  # bound of the binarizer's STE mask |w X| <= ste_clip


def _forward_math(plan: FlatPlan, lam: float, nu: float, need: tuple[bool, bool, bool, bool], out_dtype,
                  X: torch.Tensor, w_flat: torch.Tensor, mu_sigma: torch.Tensor):
    """Flat forward: ``X`` (N,), ``w_flat`` = cat(w) (sum P_l,), ``mu_sigma`` = cat(mu, sigma) (2F,) ->
    ``(L_K, kernels in out_dtype, w_x, [dL_K/dX], [lam*r], [dL_K/dmu], [dL_K/dsigma])`` (a gradient is
    None unless ``need`` asks for it, and all are None when ``lam == 0``).

    The formulas are those of ``BonnWeightBinarize`` and ``bayesian_kernel_loss`` (their docstrings);
    ``r = w X - X_hat`` is the reconstruction residual.
    """
    need_X, need_w, need_mu, need_sigma = need
    w_mean = per_layer_mean(w_flat, plan)  # mean(w) of every layer (L,)
    w_at = torch.stack((w_flat, w_mean.index_select(0, plan.w_layer)), 1).index_select(0, plan.w_index)
    w_x, w_mean_x = w_at.unbind(1)  # w and mean(w) at every kernel element
    s = sign(X)
    X_hat = w_mean_x * s  # Alg. 1 line 5: X_hat = mean(w) sign(X), the forward kernels, flat
    dX = lam_r = dmu = dsigma = None
    if lam != 0:
        F = mu_sigma.shape[0] // 2  # number of output filters of all layers
        mu, sigma = mu_sigma[:F], mu_sigma[F:]
        sigma2 = sigma * sigma
        nu_sigma_inv2 = nu / sigma2  # nu sigma_i^-2 per filter
        at_filter = torch.stack((mu, nu_sigma_inv2), 1).index_select(0, plan.filter_index)
        mu_x, nu_sigma_inv2_x = at_filter.unbind(1)
        d = s * X - mu_x  # |X| - mu_i (sign(0) = +1: X = 0 sits in the '+' mode)
        r = w_x * X - X_hat  # w X - X_hat
        filter_sum_d, filter_sum_d2 = per_filter_sum(torch.stack((d, d * d), 1), plan).unbind(1)
        inv_K = plan.inv_filter_numel  # 1 / K per filter
        # the section 2.4 objective of docs/bonn-method.md (the value of bayesian_kernel_loss)
        value = 0.5 * lam * ((r * r).sum() + (nu_sigma_inv2 * filter_sum_d2 * (1.0 + inv_K)).sum()
                             + nu * torch.log(sigma2).sum())
        if need_X:
            dX = lam * (w_x * r + nu_sigma_inv2_x * d * s)  # Eq. 13
        if need_w:
            lam_r = lam * r  # Eq. 16 (dL_K/dw = sum_i lam r X_i): summed in backward, together with Eq. 15
        if need_mu:
            dmu = -lam * nu_sigma_inv2 * inv_K * filter_sum_d  # Eq. 17
        if need_sigma:
            dsigma = lam * nu / sigma * (1.0 - filter_sum_d2 * inv_K / sigma2)  # Eq. 18
    else:
        value = X.new_zeros(())
    return value, X_hat.to(out_dtype), w_x, dX, lam_r, dmu, dsigma


def _backward_math(plan: FlatPlan, ste_clip: float, need_X: bool, need_w: bool, X: torch.Tensor,
                   w_x: torch.Tensor, G: torch.Tensor | None, g_loss: torch.Tensor, dX_loss, lam_r):
    """Flat backward: the binarizer's gradients from the kernels' gradient ``G`` (= dL_S/dX_hat), plus
    ``g_loss`` times the kernel loss's gradients ``dX_loss`` and ``lam_r`` saved by the forward."""
    dX = w_coef = None
    if G is not None:
        G_masked = clipped_grad(G, w_x * X, ste_clip)  # G 1{-1 <= w X <= 1} (bound: ste_clip)
        if need_X:
            dX = G_masked * w_x  # Eq. 12
        if need_w:
            w_coef = G_masked  # Eq. 15 is sum_i G_masked X_i (the sum below)
    if dX_loss is not None:  # Eq. 11: delta_X = dL_S/dX + dL_B/dX
        dX = dX_loss * g_loss if dX is None else torch.addcmul(dX, dX_loss, g_loss)
    if lam_r is not None:  # Eq. 14: delta_w = dL_S/dw + dL_B/dw, one shared reduction
        w_coef = lam_r * g_loss if w_coef is None else torch.addcmul(w_coef, lam_r, g_loss)
    dw = per_position_sum(w_coef * X, plan) if w_coef is not None else None  # Eqs. 15-16: sum over kernels
    return dX, dw


_COMPILED: dict[tuple, SafeCompiled] = {}


def _math(name: str, plan: FlatPlan, compile_math: bool, *static):
    """The flat math with its static arguments bound: eager, or torch.compile'd when ``compile_math``
    (cached per plan and static arguments; see ``trainables.fast.compiled``)."""
    fn = _forward_math if name == "fwd" else _backward_math

    def bound(*a):
        return fn(plan, *static, *a)

    if not compile_math:
        return bound
    key = (name, id(plan), static)
    c = _COMPILED.get(key)
    if c is None:
        if len(_COMPILED) >= 32:
            _COMPILED.clear()
        c = _COMPILED[key] = SafeCompiled(bound, dynamic=False, fullgraph=True)
    return c


class _BonnAllLayers(torch.autograd.Function):
    """Binary kernels of every layer and the Bayesian kernel loss, with analytic gradients.

    Inputs after ``(plan, opts)`` (an :class:`_Options`): ``X_1..X_L, w_1..w_L, mu_1..mu_L,
    sigma_1..sigma_L``. Outputs: the kernel loss (0-dim, the weights' dtype; zero when ``lam == 0``) and,
    when ``opts.emit``, the ``L`` forward kernels ``mean(w_l) sign(X_l)`` in ``opts.out_dtype`` (views of
    one flat buffer, laid out like each ``X_l``). The loss gradients of X, mu and sigma are computed in
    forward (they share every intermediate with the value) and scaled by the incoming gradient in
    backward, where the binarizer's gradient is added in the same pass; w's two gradients share one
    reduction.
    """

    N_ARGS = 2  # (plan, opts) before the tensors

    @staticmethod
    def forward(ctx, plan: FlatPlan, opts: _Options, *tensors: torch.Tensor):
        L = plan.num_layers
        Xs, ws, mus_sigmas = tensors[:L], tensors[L : 2 * L], tensors[2 * L :]
        need = ctx.needs_input_grad[_BonnAllLayers.N_ARGS :]
        need_X_w_mu_sigma = tuple(any(need[j * L : (j + 1) * L]) for j in range(4))
        X = flat_kernels(Xs, plan)
        w_flat = cat([w.reshape(-1) for w in ws])
        mu_sigma = cat(list(mus_sigmas))  # mu_1..mu_L, sigma_1..sigma_L
        forward_math = _math("fwd", plan, opts.compile_math, opts.lam, opts.nu, need_X_w_mu_sigma, opts.out_dtype)
        value, X_hat, w_x, dX, lam_r, dmu, dsigma = forward_math(X, w_flat, mu_sigma)
        saved = [dX, lam_r, dmu, dsigma]
        ctx.plan, ctx.opts = plan, opts
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(X, w_x, *[t for t in saved if t is not None])
        if not opts.emit:
            return value
        return (value, *unflat_kernels(X_hat, plan))

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, *g_kernels: torch.Tensor):
        plan: FlatPlan = ctx.plan
        opts: _Options = ctx.opts
        L, n0 = plan.num_layers, _BonnAllLayers.N_ARGS
        X, w_x, *rest = ctx.saved_tensors
        it = iter(rest)
        dX_loss, lam_r, dmu, dsigma = (next(it) if h else None for h in ctx.has)
        needs = ctx.needs_input_grad
        need_X = any(needs[n0 : n0 + L])
        need_w = any(needs[n0 + L : n0 + 2 * L])
        g_loss = g_loss.to(X.dtype)
        G = None  # dL_S/dX_hat, flat
        if opts.emit and any(g is not None for g in g_kernels):
            G = cat([(g if g is not None else torch.zeros(sh, dtype=X.dtype, device=X.device).permute(ip))
                     .permute(pm).reshape(-1) for g, sh, pm, ip in
                     zip(g_kernels, plan.storage_shapes, plan.perms, plan.inv_perms)]).to(X.dtype)
        backward_math = _math("bwd", plan, opts.compile_math, opts.ste_clip, need_X, need_w)
        dX, dw = backward_math(X, w_x, G, g_loss, dX_loss, lam_r)
        out: list = [None] * n0
        out += unflat_kernels(dX, plan) if dX is not None else [None] * L
        out += ([p.view(sh) for p, sh in zip(dw.split(plan.w_numel), plan.w_shapes)] if dw is not None
                else [None] * L)
        out += unflat_filters(dmu * g_loss, plan) if dmu is not None else [None] * L
        out += unflat_filters(dsigma * g_loss, plan) if dsigma is not None else [None] * L
        return tuple(o if (i < n0 or needs[i]) else None for i, o in enumerate(out))


def _tensors(layers: list) -> list[torch.Tensor]:
    return [m.weight for m in layers] + [m.w for m in layers] + [m.mu for m in layers] + [m.sigma for m in layers]


def bonn_kernels_and_loss(layers: list, lam: float, nu: float, out_dtype: torch.dtype | None = None,
                          compile_math: bool = False, ste_clip: float = 1.0
                          ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([mean(w_l) sign(X_l) for each layer], L_K)`` in one autograd node.

    Kernels are in ``out_dtype`` (default: the weights' dtype; pass the autocast dtype so the
    convolutions need no cast), laid out like each layer's ``weight``. ``L_K`` is
    :func:`trainables.losses.bayesian_kernel_loss` of ``layers`` (a zero when ``lam == 0``).
    ``compile_math``: run the flat forward and backward math torch.compile'd (a handful of fused
    kernels instead of ~80 small ones; falls back to the eager math if compiling fails).
    ``ste_clip``: the bound of the binarizer's mask ``|w X| <= ste_clip``.
    """
    plan = layer_plan(layers)
    opts = _Options(float(lam), float(nu), out_dtype or layers[0].weight.dtype, True, bool(compile_math),
                    float(ste_clip))
    value, *kernels = _BonnAllLayers.apply(plan, opts, *_tensors(layers))
    return kernels, value


def kernel_loss_all_layers(layers, lam: float, nu: float) -> torch.Tensor:
    """:func:`trainables.losses.bayesian_kernel_loss` of ``layers`` in one autograd node (no kernels).

    Same arguments and the same zero (no graph) for no layers or ``lam == 0``."""
    ls = as_layers(layers)
    if not ls:
        return torch.zeros(())
    if lam == 0:
        return ls[0].weight.new_zeros(())
    plan = layer_plan(ls)
    # ste_clip is unused: no kernels are emitted, so there is no binarizer gradient
    opts = _Options(float(lam), float(nu), ls[0].weight.dtype, False, False, 1.0)
    return _BonnAllLayers.apply(plan, opts, *_tensors(ls))
