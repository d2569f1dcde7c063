"""One flat vector for all BONN layers: the layout (index plan), flattening, per-filter and per-position sums.

No formula of the paper lives here, only bookkeeping. Every ``BonnConv2d`` of a model contributes its
latent kernels ``X`` (``(C_out, C_in, k, k)``), its modulation ``w`` (``(k, k)`` or ``(C_in, k, k)``)
and its prior ``mu``, ``sigma`` (``(C_out,)``). A :class:`FlatPlan` lays all kernels end to end:

* each ``X`` is flattened in its *storage* order (``X.permute(perm)`` is contiguous; ``perm =
  (0, 2, 3, 1)`` for channels_last), so flattening, unflattening and returned kernels are views;
* per-element broadcasts of ``w``, ``mean(w)``, ``mu`` and ``sigma`` are gathers with the precomputed
  indices ``w_index`` / ``filter_index``;
* per-filter, per-position (``w`` element) and per-layer sums are plain reductions over reshaped
  slices, one per *run* of identically shaped consecutive layers.

Nothing needs a host sync or atomics (deterministic). Users: :func:`trainables.losses.closed_form_mu_sigma_`
(reference side) and the fused all-layers step ``trainables.fast.fused`` (which imports this module,
never the other way round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FlatPlan", "LayerRun", "cat", "flat_kernels", "layer_plan", "per_filter_sum", "per_layer_mean",
           "per_position_sum", "unflat_filters", "unflat_kernels"]


@dataclass(frozen=True)
class LayerRun:
    """Consecutive layers with identical kernel/``w`` shapes and layout: contiguous in the flat vector."""

    x_start: int  # slice of the flat kernel vector
    x_stop: int
    w_start: int  # slice of the flat modulation vector
    w_stop: int
    layers: int  # number of layers in the run
    out_ch: int  # C_out of each
    filter_numel: int  # K = C_in k k, elements per output filter
    w_numel: int  # elements of one layer's w
    storage_shape: tuple[int, ...]  # one kernel in storage order, e.g. (C_out, k, k, C_in) for channels_last
    position_sum_dims: tuple[int, ...]  # dims of (layers, *storage_shape) summed for the per-w-element sums
    w_perm: tuple[int, ...] | None  # then the order that puts w's dims back in logical order (None: as is)


@dataclass(frozen=True)
class FlatPlan:
    """The flat layout of a list of BONN layers (cached per device, dtype, shapes and memory layout)."""

    x_numel: list[int]  # N_l, kernel elements of layer l
    w_numel: list[int]  # P_l, elements of w of layer l
    out_ch: list[int]  # C_out of each layer
    perms: list[tuple[int, ...]]  # storage order of each X (X.permute(perm) is contiguous)
    storage_shapes: list[torch.Size]  # shape of X.permute(perm)
    inv_perms: list[tuple[int, ...]]
    w_shapes: list[torch.Size]
    runs: list[LayerRun]
    w_index: torch.Tensor  # (N,) index into cat(w) of each flat kernel element
    filter_index: torch.Tensor  # (N,) global output-filter index of each flat kernel element
    w_layer: torch.Tensor  # (sum P_l,) layer index of each w element
    inv_filter_numel: torch.Tensor  # (F,) 1 / K_l for every filter, in the data dtype

    @property
    def num_layers(self) -> int:
        return len(self.x_numel)


_PLANS: dict[tuple, FlatPlan] = {}


def _storage_perm(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions of ``t`` from the outermost to the innermost in memory (dim 0 must stay first)."""
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    if perm[0] != 0 or not t.permute(perm).is_contiguous():
        return tuple(range(t.dim()))  # unusual layout: flattened by a copy in logical order
    return perm


def layer_plan(layers: list) -> FlatPlan:
    """The cached flat layout of ``layers`` (keyed by device, dtype, shapes and memory layout)."""
    X0 = layers[0].weight
    perms = tuple(_storage_perm(m.weight) for m in layers)
    shapes = tuple((tuple(m.weight.shape), tuple(m.w.shape)) for m in layers)
    key = (X0.device, X0.dtype, shapes, perms)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    w_index, filter_index, w_layer, inv_k, runs = [], [], [], [], []
    off_x = off_w = off_f = 0
    for li, ((xs, ws), perm) in enumerate(zip(shapes, perms)):
        if xs[len(xs) - len(ws) :] != ws:
            raise ValueError(f"w of shape {ws} is not a trailing part of weight's {xs}")
        n, p, co = math.prod(xs), math.prod(ws), xs[0]
        k = n // co
        # logical linear index of the element at each storage position
        logical = torch.arange(n, dtype=torch.int64).view(xs).permute(perm).reshape(-1)
        w_index.append(off_w + logical % p)
        filter_index.append(off_f + torch.arange(n, dtype=torch.int64) // k)
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
            runs[-1] = LayerRun(last.x_start, off_x + n, last.w_start, off_w + p, last.layers + 1, co, k, p,
                                st_shape, sum_dims, w_perm)
        else:
            runs.append(LayerRun(off_x, off_x + n, off_w, off_w + p, 1, co, k, p, st_shape, sum_dims, w_perm))
        off_x, off_w, off_f = off_x + n, off_w + p, off_f + co
    idx_dtype = torch.int32 if off_x < 2**31 - 1 else torch.int64
    dev = X0.device
    plan = FlatPlan(
        x_numel=[math.prod(xs) for xs, _ in shapes],
        w_numel=[math.prod(ws) for _, ws in shapes],
        out_ch=[xs[0] for xs, _ in shapes],
        perms=list(perms),
        storage_shapes=[torch.Size([xs[d] for d in perm]) for (xs, _), perm in zip(shapes, perms)],
        inv_perms=[tuple(sorted(range(len(perm)), key=lambda d: perm[d])) for perm in perms],
        w_shapes=[torch.Size(ws) for _, ws in shapes],
        runs=runs,
        w_index=torch.cat(w_index).to(dev, idx_dtype),
        filter_index=torch.cat(filter_index).to(dev, idx_dtype),
        w_layer=torch.cat(w_layer).to(dev, idx_dtype),
        inv_filter_numel=torch.cat(inv_k).to(dev, X0.dtype),
    )
    if len(_PLANS) >= 16:  # a few models per process at most; keep the cache bounded
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, or the one part itself (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def flat_kernels(tensors, plan: FlatPlan) -> torch.Tensor:
    """Kernel-shaped tensors (each laid out like its layer's ``weight``) -> one flat vector, storage order."""
    return cat([t.permute(pm).reshape(-1) for t, pm in zip(tensors, plan.perms)])


def unflat_kernels(flat: torch.Tensor, plan: FlatPlan) -> list[torch.Tensor]:
    """Flat kernel-layout vector -> per-layer views shaped and strided like each ``weight``."""
    parts = flat.split(plan.x_numel)
    return [p.view(sh).permute(ip) for p, sh, ip in zip(parts, plan.storage_shapes, plan.inv_perms)]


def per_filter_sum(x: torch.Tensor, plan: FlatPlan) -> torch.Tensor:
    """``x``: flat kernel-layout tensor ``(N, *t)`` -> sums over each output filter ``(F, *t)``."""
    t = x.shape[1:]
    return cat([x[r.x_start : r.x_stop].view(r.layers * r.out_ch, r.filter_numel, *t).sum(1) for r in plan.runs])


def unflat_filters(x: torch.Tensor, plan: FlatPlan) -> list[torch.Tensor]:
    """Per-filter vector ``(F,)`` -> one ``(C_out,)`` view per layer."""
    return list(x.split(plan.out_ch))


def per_position_sum(x: torch.Tensor, plan: FlatPlan) -> torch.Tensor:
    """``x``: flat kernel-layout ``(N,)`` -> sums over all kernels for each ``w`` element ``(sum P_l,)``."""
    out = []
    for r in plan.runs:
        s = x[r.x_start : r.x_stop].view(r.layers, *r.storage_shape).sum(r.position_sum_dims)
        if r.w_perm is not None:  # (layers, w dims in storage order) -> logical order
            s = s.permute(0, *(1 + i for i in r.w_perm))
        out.append(s.reshape(-1))
    return cat(out)


def per_layer_mean(w_flat: torch.Tensor, plan: FlatPlan) -> torch.Tensor:
    """Flat modulation vector ``(sum P_l,)`` -> ``mean(w)`` of every layer ``(L,)``."""
    return cat([w_flat[r.w_start : r.w_stop].view(r.layers, r.w_numel).mean(1) for r in plan.runs])
