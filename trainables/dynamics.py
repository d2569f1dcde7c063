"""Training dynamics of a binary network, measured once per epoch (what a BNN researcher looks at).

A 1-bit layer computes with ``sign(X)`` only, so it learns exactly when signs of its latent weights flip.
:class:`Dynamics` reports, after every epoch (keys of the ``fit`` metrics):

================================ =============================================================================
``flip_frac``                    fraction of the binary weights whose sign changed during the epoch (all binary
                                 3x3 convs together; the end of the previous epoch, or the start, as reference)
``flip_frac_init``               fraction whose sign differs from the sign at initialisation
``latent_abs_mean``              mean ``|X|`` over all binary weights
``flip/convNN``                  ``flip_frac`` of binary conv NN (01 = the first, forward order)
``latent_abs/convNN``            mean ``|X|`` of conv NN (paper Fig. 4 reads these off the histograms)
``wbar/convNN``                  BONN: the forward scale ``mean(w)`` of conv NN (paper Fig. 5)
``mu/convNN``, ``sigma/convNN``  BONN: mean of the per-filter prior ``mu_i``, ``sigma_i`` of conv NN
``grad_norm/G``                  L2 norm of the last step's gradient of parameter group G (``latent``,
                                 ``decay``, ``no_decay``, ``slow``, ``centers``; trainables.train)
``update_norm/G``                L2 norm of the change of group G's parameters over the epoch
``update_rel/G``                 ``update_norm/G`` divided by the norm of G's parameters at the epoch start
================================ =============================================================================

For ``binarize="none"`` the backbone convs are full precision; their "signs" are still tracked, so
the full-precision baseline shows how much a real-valued net would flip in the same place.

The signs at initialisation travel in the checkpoint (bit-packed), so a resumed training reports the same
numbers as an uninterrupted one. Costs one copy of the parameters per epoch and a few reductions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

__all__ = ["Dynamics"]


def _signs(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [w.detach() >= 0 for w in weights]


def _pack(signs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.packbits(s.flatten().cpu().numpy())) for s in signs]


def _unpack(packed: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p, w in zip(packed, like, strict=True):
        bits = np.unpackbits(p.numpy(), count=w.numel()).astype(bool)
        out.append(torch.from_numpy(bits).view(w.shape).to(w.device))
    return out


class Dynamics:
    """Per-epoch dynamics of one training (module docstring). ``start_epoch`` before an epoch's first
    step, ``end_epoch`` after its last one returns the metrics."""

    def __init__(self, model: nn.Module, groups: Mapping[str, list[torch.Tensor]],
                 state: Mapping[str, Any] | None = None) -> None:
        from .models import backbone_convs

        self.convs = backbone_convs(model)
        self.weights = [c.weight for c in self.convs]
        self.groups = {k: list(v) for k, v in groups.items() if v}
        if state is not None and state.get("init_signs") is not None:
            self.init_signs = _unpack(list(state["init_signs"]), self.weights)
        else:
            self.init_signs = _signs(self.weights)
        self._prev_signs: list[torch.Tensor] = []
        self._start: dict[str, list[torch.Tensor]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"init_signs": _pack(self.init_signs)}

    @torch.no_grad()
    def start_epoch(self) -> None:
        self._prev_signs = _signs(self.weights)
        self._start = {k: [p.detach().clone() for p in ps] for k, ps in self.groups.items()}

    @torch.no_grad()
    def end_epoch(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.weights:
            now = _signs(self.weights)
            n = sum(w.numel() for w in self.weights)
            flips = torch.stack([(a != b).sum() for a, b in zip(now, self._prev_signs)]).float()
            flips_init = torch.stack([(a != b).sum() for a, b in zip(now, self.init_signs)]).float()
            abs_sum = torch.stack([w.detach().float().abs().sum() for w in self.weights])
            numel = torch.tensor([float(w.numel()) for w in self.weights], device=flips.device)
            per_layer = [flips / numel, abs_sum / numel]
            names = ["flip", "latent_abs"]
            if all(hasattr(c, "w") and hasattr(c, "mu") for c in self.convs):
                per_layer += [torch.stack([c.w.detach().float().mean() for c in self.convs]),
                              torch.stack([c.mu.detach().float().mean() for c in self.convs]),
                              torch.stack([c.sigma.detach().float().mean() for c in self.convs])]
                names += ["wbar", "mu", "sigma"]
            table = torch.stack(per_layer).cpu().tolist()  # one host sync
            out["flip_frac"] = float(flips.sum().item()) / n
            out["flip_frac_init"] = float(flips_init.sum().item()) / n
            out["latent_abs_mean"] = float(abs_sum.sum().item()) / n
            for name, row in zip(names, table):
                for i, v in enumerate(row):
                    out[f"{name}/conv{i + 1:02d}"] = float(v)
        for g, ps in self.groups.items():
            grads = [p.grad.detach().float().norm() for p in ps if p.grad is not None]
            delta = [(p.detach().float() - s.float()).norm() for p, s in zip(ps, self._start.get(g, []))]
            start = [s.float().norm() for s in self._start.get(g, [])]
            vals = [torch.stack(grads).norm() if grads else None,
                    torch.stack(delta).norm() if delta else None,
                    torch.stack(start).norm() if start else None]
            gnorm, unorm, snorm = (None if v is None else float(v.item()) for v in vals)
            if gnorm is not None:
                out[f"grad_norm/{g}"] = gnorm
            if unorm is not None:
                out[f"update_norm/{g}"] = unorm
                if snorm:
                    out[f"update_rel/{g}"] = unorm / snorm
        return out
