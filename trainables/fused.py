"""All BONN layers at once: one pass over the latent weights per training step.

This module holds no formula of its own. It evaluates, for every ``BonnConv2d`` of a model together,

* the forward kernel and the backward rule of :class:`trainables.binarize.BonnWeightBinarize`
  (``X_hat = mean(w) sign(X)``; ``dL/dX = G 1{|wX| <= 1} w``, ``dL/dw = sum over kernels of
  G 1{|wX| <= 1} X``), and
* the value and the gradients of :func:`trainables.losses.bayesian_kernel_loss` (its docstring lists
  them with the paper's equation numbers),

over one flat vector made of all layers' kernels, so a step costs a fixed number of GPU kernels
(about 40) instead of ~25 small ones per layer, and the gradient of each latent kernel from the
binarizer and from the kernel loss is summed in the same elementwise pass (no per-layer gradient
accumulation). Both reference implementations stay the specification: ``tests/unit/test_fused.py``
compares one training step's gradients of every parameter against them, in float32 and under bf16
autocast.

Layout. Each latent kernel ``X`` is flattened in its *storage* order (``X.permute(perm)`` is
contiguous; ``perm = (0, 2, 3, 1)`` for channels_last), so flattening, unflattening and the returned
kernels are views: a channels_last model gets channels_last kernels without a copy. Per-element
broadcasts (``w``, ``mean(w)``, ``mu``, ``sigma``) are gathers with precomputed indices; per-filter,
per-position and per-layer sums are plain reductions over reshaped slices, one per run of
identically shaped consecutive layers. Nothing needs a host sync or atomics (deterministic), so the
whole step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .binarize import clipped_grad, sign

__all__ = ["bonn_kernels_and_loss", "flat_weights", "kernel_loss_all_layers", "layer_plan", "per_filter_sum",
           "unflat_filters"]


@dataclass(frozen=True)
class _Run:
    """Consecutive layers with identical kernel/``w`` shapes and layout: contiguous in the flat vector."""

    x0: int  # slice of the flat kernel vector
    x1: int
    w0: int  # slice of the flat modulation vector
    w1: int
    layers: int  # m
    out_ch: int  # C_out
    k: int  # elements per output filter, C_in k k
    p: int  # elements of w
    to_logical: torch.Tensor | None  # (k,) storage position of each logical in-filter position (None: same)


@dataclass
class _Plan:
    numel_x: list[int]  # N_l
    numel_w: list[int]  # P_l
    out_ch: list[int]  # C_out of each layer
    perms: list[tuple[int, ...]]  # storage order of each X (X.permute(perm) is contiguous)
    st_shapes: list[torch.Size]  # shape of X.permute(perm)
    inv_perms: list[tuple[int, ...]]
    w_shapes: list[torch.Size]
    runs: list[_Run]
    w_idx: torch.Tensor  # (N,) index into cat(w) of each flat kernel element
    f_idx: torch.Tensor  # (N,) global output-filter index of each flat kernel element
    w_layer: torch.Tensor  # (sum P_l,) layer index of each w element
    inv_k: torch.Tensor  # (F,) 1 / K_l for every filter, in the data dtype


_PLANS: dict[tuple, _Plan] = {}


def _storage_perm(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions of ``t`` from the outermost to the innermost in memory (dim 0 must stay first)."""
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    if perm[0] != 0 or not t.permute(perm).is_contiguous():
        return tuple(range(t.dim()))  # unusual layout: flattened by a copy in logical order
    return perm


def layer_plan(layers: list) -> _Plan:
    """The cached flat layout of ``layers`` (keyed by device, dtype, shapes and memory layout)."""
    X0 = layers[0].weight
    perms = tuple(_storage_perm(m.weight) for m in layers)
    shapes = tuple((tuple(m.weight.shape), tuple(m.w.shape)) for m in layers)
    key = (X0.device, X0.dtype, shapes, perms)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    w_idx, f_idx, w_layer, inv_k, runs = [], [], [], [], []
    off_x = off_w = off_f = 0
    for li, ((xs, ws), perm) in enumerate(zip(shapes, perms)):
        if xs[len(xs) - len(ws) :] != ws:
            raise ValueError(f"w of shape {ws} is not a trailing part of weight's {xs}")
        n, p, co = math.prod(xs), math.prod(ws), xs[0]
        k = n // co
        # logical linear index of the element at each storage position
        logical = torch.arange(n, dtype=torch.int64).view(xs).permute(perm).reshape(-1)
        w_idx.append(off_w + logical % p)
        f_idx.append(off_f + torch.arange(n, dtype=torch.int64) // k)
        w_layer.append(torch.full((p,), li, dtype=torch.int64))
        inv_k.append(torch.full((co,), 1.0 / k, dtype=torch.float64))
        in_filter = logical[:k]  # filter 0; identical offsets for every filter (dim 0 outermost)
        to_logical = None
        if not torch.equal(in_filter, torch.arange(k)):
            to_logical = torch.empty(k, dtype=torch.int64)
            to_logical[in_filter] = torch.arange(k)
        same = li > 0 and (shapes[li - 1], perms[li - 1]) == ((xs, ws), perm)
        if same:
            last = runs[-1]
            runs[-1] = _Run(last.x0, off_x + n, last.w0, off_w + p, last.layers + 1, co, k, p, last.to_logical)
        else:
            runs.append(_Run(off_x, off_x + n, off_w, off_w + p, 1, co, k, p, to_logical))
        off_x, off_w, off_f = off_x + n, off_w + p, off_f + co
    idx_dtype = torch.int32 if off_x < 2**31 - 1 else torch.int64
    dev = X0.device
    runs = [r if r.to_logical is None else _Run(*[getattr(r, f) for f in ("x0", "x1", "w0", "w1", "layers",
                                                                             "out_ch", "k", "p")],
                                                    r.to_logical.to(dev))
            for r in runs]
    plan = _Plan(
        numel_x=[math.prod(xs) for xs, _ in shapes],
        numel_w=[math.prod(ws) for _, ws in shapes],
        out_ch=[xs[0] for xs, _ in shapes],
        perms=list(perms),
        st_shapes=[torch.Size([xs[d] for d in perm]) for (xs, _), perm in zip(shapes, perms)],
        inv_perms=[tuple(sorted(range(len(perm)), key=lambda d: perm[d])) for perm in perms],
        w_shapes=[torch.Size(ws) for _, ws in shapes],
        runs=runs,
        w_idx=torch.cat(w_idx).to(dev, idx_dtype),
        f_idx=torch.cat(f_idx).to(dev, idx_dtype),
        w_layer=torch.cat(w_layer).to(dev, idx_dtype),
        inv_k=torch.cat(inv_k).to(dev, X0.dtype),
    )
    if len(_PLANS) >= 16:  # a few models per process at most; keep the cache bounded
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def flat_weights(tensors, plan: _Plan) -> torch.Tensor:
    """Kernel-shaped tensors (each laid out like its layer's ``weight``) -> one flat vector, storage order."""
    return _cat([t.permute(pm).reshape(-1) for t, pm in zip(tensors, plan.perms)])


def _unflat_kernels(flat: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
    """Flat kernel-layout vector -> per-layer views shaped and strided like each ``weight``."""
    parts = flat.split(plan.numel_x)
    return [p.view(sh).permute(ip) for p, sh, ip in zip(parts, plan.st_shapes, plan.inv_perms)]


def per_filter_sum(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``x``: flat kernel-layout tensor ``(N, *t)`` -> sums over each output filter ``(F, *t)``."""
    t = x.shape[1:]
    return _cat([x[r.x0 : r.x1].view(r.layers * r.out_ch, r.k, *t).sum(1) for r in plan.runs])


def unflat_filters(x: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
    """Per-filter vector ``(F,)`` -> one ``(C_out,)`` view per layer."""
    return list(x.split(plan.out_ch))


def _per_position_sum(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``x``: flat kernel-layout ``(N,)`` -> sums over all kernels for each ``w`` element ``(sum P_l,)``."""
    out = []
    for r in plan.runs:
        s = x[r.x0 : r.x1].view(r.layers, r.out_ch, r.k).sum(1)  # per in-filter position, storage order
        if r.to_logical is not None:
            s = s.index_select(1, r.to_logical)  # -> logical order, w's dims trailing
        out.append(s.view(r.layers, r.k // r.p, r.p).sum(1).view(-1))
    return _cat(out)


def _per_layer_mean_w(wc: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Flat modulation vector ``(sum P_l,)`` -> ``mean(w)`` of every layer ``(L,)``."""
    return _cat([wc[r.w0 : r.w1].view(r.layers, r.p).mean(1) for r in plan.runs])


class _BonnAllLayers(torch.autograd.Function):
    """Binary kernels of every layer and the Bayesian kernel loss, with analytic gradients.

    Inputs after ``(plan, lam, nu, out_dtype, emit)``: ``X_1..X_L, w_1..w_L, mu_1..mu_L,
    sigma_1..sigma_L``. Outputs: the kernel loss (0-dim, the weights' dtype; zero when ``lam == 0``) and, when
    ``emit``, the ``L`` forward kernels ``mean(w_l) sign(X_l)`` in ``out_dtype`` (views of one flat
    buffer, laid out like each ``X_l``). The loss gradients are computed in forward (they share every
    intermediate with the value) and scaled by the incoming gradient in backward, where the
    binarizer's gradient is added in the same pass.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, lam: float, nu: float, out_dtype, emit: bool, *tensors: torch.Tensor):
        L = len(plan.numel_x)
        Xs, ws, mus, sigmas = tensors[:L], tensors[L : 2 * L], tensors[2 * L : 3 * L], tensors[3 * L :]
        need = ctx.needs_input_grad[5:]
        need_x, need_w, need_mu, need_sigma = (any(need[j * L : (j + 1) * L]) for j in range(4))

        X = flat_weights(Xs, plan)
        wc = _cat([w.reshape(-1) for w in ws])
        wbar = _per_layer_mean_w(wc, plan)  # (L,)
        pos = torch.stack((wc, wbar.index_select(0, plan.w_layer)), 1).index_select(0, plan.w_idx)
        w_e, wbar_e = pos.unbind(1)
        s = sign(X)
        xhat = wbar_e * s  # the forward kernels, flat

        saved = [None, None, None, None]
        if lam != 0:
            mc = _cat(list(mus))
            sc = _cat(list(sigmas))
            s2 = sc * sc
            nis = nu / s2  # nu * sigma^-2 per filter
            fil = torch.stack((mc, nis), 1).index_select(0, plan.f_idx)
            mu_e, nis_e = fil.unbind(1)
            d = s * X - mu_e  # |X| - mu (sign(0) = +1: X = 0 sits in the '+' mode)
            r = w_e * X - xhat  # w*X - X_hat
            D1, D2 = per_filter_sum(torch.stack((d, d * d), 1), plan).unbind(1)  # per filter sum d, sum d^2
            value = 0.5 * lam * ((r * r).sum() + (nis * D2 * (1.0 + plan.inv_k)).sum() + nu * torch.log(s2).sum())
            if need_x:
                saved[0] = lam * (w_e * r + nis_e * d * s)
            if need_w:
                saved[1] = lam * _per_position_sum(r * X, plan)
            if need_mu:
                saved[2] = -lam * nis * plan.inv_k * D1
            if need_sigma:
                saved[3] = lam * nu / sc * (1.0 - D2 * plan.inv_k / s2)
        else:
            value = X.new_zeros(())
        ctx.plan, ctx.emit = plan, emit
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(X, w_e, *[t for t in saved if t is not None])
        if not emit:
            return value
        kernels = _unflat_kernels(xhat.to(out_dtype), plan)
        return (value, *kernels)

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, *g_kernels: torch.Tensor):
        plan: _Plan = ctx.plan
        L = len(plan.numel_x)
        X, w_e, *rest = ctx.saved_tensors
        it = iter(rest)
        gX_k, gw_k, gmu_k, gsig_k = (next(it) if h else None for h in ctx.has)
        needs = ctx.needs_input_grad
        need_x = any(needs[5 : 5 + L])
        need_w = any(needs[5 + L : 5 + 2 * L])
        g_loss = g_loss.to(X.dtype)

        gX = gw = None
        if ctx.emit and any(g is not None for g in g_kernels):
            G = _cat([(g if g is not None else torch.zeros(sh, dtype=X.dtype, device=X.device).permute(ip))
                      .permute(pm).reshape(-1) for g, sh, pm, ip in
                      zip(g_kernels, plan.st_shapes, plan.perms, plan.inv_perms)]).to(X.dtype)
            gm = clipped_grad(G, w_e * X)  # G * 1{-1 <= w X <= 1}
            if need_x:
                gX = gm * w_e
            if need_w:
                gw = _per_position_sum(gm * X, plan)
        if gX_k is not None:
            gX = gX_k * g_loss if gX is None else torch.addcmul(gX, gX_k, g_loss)
        if gw_k is not None:
            gw = gw_k * g_loss if gw is None else torch.addcmul(gw, gw_k, g_loss)
        out: list = [None] * 5
        out += _unflat_kernels(gX, plan) if gX is not None else [None] * L
        out += ([p.view(sh) for p, sh in zip(gw.split(plan.numel_w), plan.w_shapes)] if gw is not None
                else [None] * L)
        out += unflat_filters(gmu_k * g_loss, plan) if gmu_k is not None else [None] * L
        out += unflat_filters(gsig_k * g_loss, plan) if gsig_k is not None else [None] * L
        return tuple(o if (i < 5 or needs[i]) else None for i, o in enumerate(out))


def _tensors(layers: list) -> list[torch.Tensor]:
    return [m.weight for m in layers] + [m.w for m in layers] + [m.mu for m in layers] + [m.sigma for m in layers]


def bonn_kernels_and_loss(layers: list, lam: float, nu: float,
                          out_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([mean(w_l) sign(X_l) for each layer], L_K)`` in one autograd node.

    Kernels are in ``out_dtype`` (default: the weights' dtype; pass the autocast dtype so the
    convolutions need no cast), laid out like each layer's ``weight``. ``L_K`` is
    :func:`trainables.losses.bayesian_kernel_loss` of ``layers`` (a zero when ``lam == 0``).
    """
    plan = layer_plan(layers)
    dt = out_dtype or layers[0].weight.dtype
    value, *kernels = _BonnAllLayers.apply(plan, float(lam), float(nu), dt, True, *_tensors(layers))
    return kernels, value


def kernel_loss_all_layers(layers: list, lam: float, nu: float) -> torch.Tensor:
    """:func:`trainables.losses.bayesian_kernel_loss` of ``layers`` in one autograd node (no kernels)."""
    plan = layer_plan(layers)
    return _BonnAllLayers.apply(plan, float(lam), float(nu), layers[0].weight.dtype, False, *_tensors(layers))
