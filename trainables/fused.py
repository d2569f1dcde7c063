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
from dataclasses import dataclass, field

import torch

from .binarize import clipped_grad, sign
from .compiled import SafeCompiled

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
    st_shape: tuple[int, ...]  # one kernel in storage order, e.g. (C_out, k, k, C_in) for channels_last
    sum_dims: tuple[int, ...]  # dims of (layers, *st_shape) summed for the per-position (w) sums
    w_perm: tuple[int, ...] | None  # then the order that puts w's dims back in logical order (None: as is)


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
    compile_math: bool = field(default=False)  # run the flat math torch.compile'd (set_compile_math)
    ste_clip: float = field(default=1.0)  # bound of the Eq. 12/15 mask |w X| <= ste_clip


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
        # per-position sums: over the output filters and every kernel dim that w does not cover
        w_dims = set(range(len(xs) - len(ws), len(xs)))
        st_shape = tuple(xs[d] for d in perm)
        sum_dims = (1,) + tuple(1 + j for j, d in enumerate(perm) if j > 0 and d not in w_dims)
        kept = [d for d in perm if d in w_dims]  # w's dims in storage order
        w_perm = None if kept == sorted(kept) else tuple(sorted(range(len(kept)), key=lambda i: kept[i]))
        same = li > 0 and (shapes[li - 1], perms[li - 1]) == ((xs, ws), perm)
        if same:
            last = runs[-1]
            runs[-1] = _Run(last.x0, off_x + n, last.w0, off_w + p, last.layers + 1, co, k, p, st_shape,
                            sum_dims, w_perm)
        else:
            runs.append(_Run(off_x, off_x + n, off_w, off_w + p, 1, co, k, p, st_shape, sum_dims, w_perm))
        off_x, off_w, off_f = off_x + n, off_w + p, off_f + co
    idx_dtype = torch.int32 if off_x < 2**31 - 1 else torch.int64
    dev = X0.device
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
        s = x[r.x0 : r.x1].view(r.layers, *r.st_shape).sum(r.sum_dims)  # (layers, w dims in storage order)
        if r.w_perm is not None:
            s = s.permute(0, *(1 + i for i in r.w_perm))
        out.append(s.reshape(-1))
    return _cat(out)


def _per_layer_mean_w(wc: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Flat modulation vector ``(sum P_l,)`` -> ``mean(w)`` of every layer ``(L,)``."""
    return _cat([wc[r.w0 : r.w1].view(r.layers, r.p).mean(1) for r in plan.runs])


def _forward_math(plan: _Plan, lam: float, nu: float, need: tuple[bool, bool, bool, bool], out_dtype,
                  X: torch.Tensor, wc: torch.Tensor, pf: torch.Tensor):
    """Flat forward: ``X`` (N,), ``wc`` (sum P_l,), ``pf`` = cat(mu, sigma) (2F,) ->
    ``(value, kernels in out_dtype, w_e, [lam*dL/dX], [lam*r], [dL/dmu], [dL/dsigma])``.

    The formulas are those of ``BonnWeightBinarize`` and ``bayesian_kernel_loss`` (their docstrings).
    """
    need_x, need_w, need_mu, need_sigma = need
    wbar = _per_layer_mean_w(wc, plan)  # (L,)
    pos = torch.stack((wc, wbar.index_select(0, plan.w_layer)), 1).index_select(0, plan.w_idx)
    w_e, wbar_e = pos.unbind(1)
    s = sign(X)
    xhat = wbar_e * s  # the forward kernels, flat
    gX = lr = gmu = gsig = None
    if lam != 0:
        F_ = pf.shape[0] // 2
        mc, sc = pf[:F_], pf[F_:]
        s2 = sc * sc
        nis = nu / s2  # nu * sigma^-2 per filter
        fil = torch.stack((mc, nis), 1).index_select(0, plan.f_idx)
        mu_e, nis_e = fil.unbind(1)
        d = s * X - mu_e  # |X| - mu (sign(0) = +1: X = 0 sits in the '+' mode)
        r = w_e * X - xhat  # w*X - X_hat
        D1, D2 = per_filter_sum(torch.stack((d, d * d), 1), plan).unbind(1)  # per filter sum d, sum d^2
        value = 0.5 * lam * ((r * r).sum() + (nis * D2 * (1.0 + plan.inv_k)).sum() + nu * torch.log(s2).sum())
        if need_x:
            gX = lam * (w_e * r + nis_e * d * s)
        if need_w:
            lr = lam * r  # dL/dw = per-position sum of lam r X, taken in backward with the binarizer's part
        if need_mu:
            gmu = -lam * nis * plan.inv_k * D1
        if need_sigma:
            gsig = lam * nu / sc * (1.0 - D2 * plan.inv_k / s2)
    else:
        value = X.new_zeros(())
    return value, xhat.to(out_dtype), w_e, gX, lr, gmu, gsig


def _backward_math(plan: _Plan, need_x: bool, need_w: bool, X: torch.Tensor, w_e: torch.Tensor,
                   G: torch.Tensor | None, g_loss: torch.Tensor, gX_k, lr_k):
    """Flat backward: binarizer gradient from the kernels' gradient ``G`` plus ``g_loss`` times the loss's."""
    gX = coef = None
    if G is not None:
        gm = clipped_grad(G, w_e * X, plan.ste_clip)  # G * 1{-1 <= w X <= 1} (bound: ste_clip)
        if need_x:
            gX = gm * w_e
        if need_w:
            coef = gm
    if gX_k is not None:
        gX = gX_k * g_loss if gX is None else torch.addcmul(gX, gX_k, g_loss)
    if lr_k is not None:
        coef = lr_k * g_loss if coef is None else torch.addcmul(coef, lr_k, g_loss)
    gw = _per_position_sum(coef * X, plan) if coef is not None else None
    return gX, gw


_COMPILED: dict[tuple, SafeCompiled] = {}


def _math(name: str, plan: _Plan, *static):
    """The flat math with its static arguments bound: eager, or torch.compile'd when
    ``plan.compile_math`` (cached per plan and static arguments; see ``trainables.compiled``)."""
    fn = _forward_math if name == "fwd" else _backward_math

    def bound(*a):
        return fn(plan, *static, *a)

    if not plan.compile_math:
        return bound
    key = (name, id(plan), plan.ste_clip, static)
    c = _COMPILED.get(key)
    if c is None:
        if len(_COMPILED) >= 32:
            _COMPILED.clear()
        c = _COMPILED[key] = SafeCompiled(bound, dynamic=False, fullgraph=True)
    return c


class _BonnAllLayers(torch.autograd.Function):
    """Binary kernels of every layer and the Bayesian kernel loss, with analytic gradients.

    Inputs after ``(plan, lam, nu, out_dtype, emit)``: ``X_1..X_L, w_1..w_L, mu_1..mu_L,
    sigma_1..sigma_L``. Outputs: the kernel loss (0-dim, the weights' dtype; zero when ``lam == 0``) and, when
    ``emit``, the ``L`` forward kernels ``mean(w_l) sign(X_l)`` in ``out_dtype`` (views of one flat
    buffer, laid out like each ``X_l``). The loss gradients of X, mu and sigma are computed in forward
    (they share every intermediate with the value) and scaled by the incoming gradient in backward,
    where the binarizer's gradient is added in the same pass; w's two gradients share one reduction.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, lam: float, nu: float, out_dtype, emit: bool, *tensors: torch.Tensor):
        L = len(plan.numel_x)
        Xs, ws, pfs = tensors[:L], tensors[L : 2 * L], tensors[2 * L :]
        need = ctx.needs_input_grad[5:]
        need4 = tuple(any(need[j * L : (j + 1) * L]) for j in range(4))
        X = flat_weights(Xs, plan)
        wc = _cat([w.reshape(-1) for w in ws])
        pf = _cat(list(pfs))  # mu_1..mu_L, sigma_1..sigma_L
        value, kflat, w_e, gX_k, lr_k, gmu_k, gsig_k = _math("fwd", plan, float(lam), float(nu), need4,
                                                              out_dtype)(X, wc, pf)
        saved = [gX_k, lr_k, gmu_k, gsig_k]
        ctx.plan, ctx.emit, ctx.need4 = plan, emit, need4
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(X, w_e, *[t for t in saved if t is not None])
        if not emit:
            return value
        return (value, *_unflat_kernels(kflat, plan))

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, *g_kernels: torch.Tensor):
        plan: _Plan = ctx.plan
        L = len(plan.numel_x)
        X, w_e, *rest = ctx.saved_tensors
        it = iter(rest)
        gX_k, lr_k, gmu_k, gsig_k = (next(it) if h else None for h in ctx.has)
        needs = ctx.needs_input_grad
        need_x = any(needs[5 : 5 + L])
        need_w = any(needs[5 + L : 5 + 2 * L])
        g_loss = g_loss.to(X.dtype)
        G = None
        if ctx.emit and any(g is not None for g in g_kernels):
            G = _cat([(g if g is not None else torch.zeros(sh, dtype=X.dtype, device=X.device).permute(ip))
                      .permute(pm).reshape(-1) for g, sh, pm, ip in
                      zip(g_kernels, plan.st_shapes, plan.perms, plan.inv_perms)]).to(X.dtype)
        gX, gw = _math("bwd", plan, need_x, need_w)(X, w_e, G, g_loss, gX_k, lr_k)
        out: list = [None] * 5
        out += _unflat_kernels(gX, plan) if gX is not None else [None] * L
        out += ([p.view(sh) for p, sh in zip(gw.split(plan.numel_w), plan.w_shapes)] if gw is not None
                else [None] * L)
        out += unflat_filters(gmu_k * g_loss, plan) if gmu_k is not None else [None] * L
        out += unflat_filters(gsig_k * g_loss, plan) if gsig_k is not None else [None] * L
        return tuple(o if (i < 5 or needs[i]) else None for i, o in enumerate(out))


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
    """
    plan = layer_plan(layers)
    plan.compile_math = bool(compile_math)
    plan.ste_clip = float(ste_clip)
    dt = out_dtype or layers[0].weight.dtype
    value, *kernels = _BonnAllLayers.apply(plan, float(lam), float(nu), dt, True, *_tensors(layers))
    return kernels, value


def kernel_loss_all_layers(layers: list, lam: float, nu: float) -> torch.Tensor:
    """:func:`trainables.losses.bayesian_kernel_loss` of ``layers`` in one autograd node (no kernels)."""
    plan = layer_plan(layers)
    plan.compile_math = False
    plan.ste_clip = 1.0  # unused: no kernels are emitted, so no binarizer gradient
    return _BonnAllLayers.apply(plan, float(lam), float(nu), layers[0].weight.dtype, False, *_tensors(layers))
