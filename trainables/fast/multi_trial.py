"""K trials of one architecture trained as one model (horizontal fusion, HFTA-style; docs/multi-trial.md).

K reference models (``trainables.models``, one per trial) are stacked member-major into one model:
each conv becomes one grouped conv (``groups=K``) on ``(B, K*C, H, W)`` activations (the stem, fed the
shared batch, one conv with ``K*C_out`` outputs); a ``BonnConv2d`` keeps ``BonnWeightBinarize``'s rule
with ``mean(w)`` per member (:class:`_MemberBonnBinarize`); BatchNorm and PReLU over ``K*C`` channels
are per member by construction; the FC is a batched matmul. The model code of ``trainables.models``
runs unchanged. The losses are ``(K,)`` vectors (cross-entropy, :func:`member_kernel_loss`,
:class:`MemberFeatureLoss`) and the step backpropagates their sum: members share no parameter, so each
gets its own member's gradient. :class:`MemberSGD` steps all members with per-member lr / momentum /
weight decay device tensors; ``tests/unit/test_multi_trial.py`` checks K members against K ``Trainer``
runs. Supported: bonn, SGD, ``mu_sigma_update="sgd"`` (not xnor/none, Adam, closed form, DDP)."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..binarize import ACT_STES, clipped_grad, sign
from ..config import TrainConfig
from ..layers import BonnConv2d, XnorConv2d
from ..losses import BayesianFeatureLoss, _CenterLossGather, clamp_prior_
from ..models import AvgPoolPad
from ..optim import build_param_groups
from ..schedule import LrFactor
from .cuda_graph import CapturedSteps

__all__ = ["MemberFeatureLoss", "MemberSGD", "MultiTrainer", "PACK_KEYS", "member_kernel_loss", "stack_models"]

#: config keys every member of a pack must share (the architecture, the data stream, the run length)
PACK_KEYS = ("model", "width", "block_style", "shortcut", "dropout", "binarize", "ste_clip", "act_clip",
             "dataset", "data_root", "val_fraction", "batch_size", "epochs", "optimizer", "mu_sigma_update")


# ============================================================================ per-member math
def _wb(w: torch.Tensor, X5: torch.Tensor) -> torch.Tensor:
    """``w`` ``(K, *w_shape)`` broadcastable against ``X5`` ``(K, C_out, C_in, k, k)``."""
    return w.view(w.shape[0], *([1] * (X5.dim() - w.dim())), *w.shape[1:])


class _MemberBonnBinarize(torch.autograd.Function):
    """``BonnWeightBinarize`` of every member at once: ``X`` ``(K*C_out, C_in, k, k)``, ``w``
    ``(K, *w_shape)``; the forward kernel of member k uses ``mean(w_k)``, the backward is that
    function's rule per member (mask ``|w X| <= clip``, ``w`` gradient summed over the member's kernels)."""

    @staticmethod
    def forward(ctx, X: torch.Tensor, w: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(X, w)
        ctx.clip = float(clip)
        K = w.shape[0]
        X5 = X.view(K, -1, *X.shape[1:])
        wbar = _wb(w.flatten(1).mean(1).view(K, *([1] * (w.dim() - 1))), X5).to(X.dtype)
        return torch.where(X5 >= 0, wbar, -wbar).reshape(X.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        X, w = ctx.saved_tensors
        K = w.shape[0]
        X5 = X.view(K, -1, *X.shape[1:])
        wb = _wb(w, X5)
        gm = clipped_grad(grad_out.reshape(X5.shape), wb * X5, ctx.clip)
        gX = (gm * wb).reshape(X.shape) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            lead = X5.dim() - w.dim() + 1  # dims of X5 that w does not cover, after the member dim
            gw = (gm * X5).sum(dim=tuple(range(1, lead)))
        return gX, gw, None


def member_kernel_loss(layers: Sequence["MultiBonnConv2d"], lam: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """``trainables.losses.bayesian_kernel_loss`` of each member, ``(K,)``: the same objective (value and
    autograd gradients, see that docstring) with ``lam``, ``nu`` given per member as ``(K,)`` tensors.
    A member with ``lam = 0`` gets a zero loss and zero gradients (the reference skips the term)."""
    total = None
    for m in layers:
        K = m.members
        X = m.weight.reshape(K, m.member_out, -1)  # (K, C_out, C_in k k)
        Kel = X.shape[2]
        X5 = m.weight.view(K, m.member_out, *m.weight.shape[1:])
        wX = (_wb(m.w, X5) * X5).reshape(X.shape)
        s = sign(X.detach())
        X_hat = m.w.detach().flatten(1).mean(1).view(K, 1, 1) * s
        recon = ((X_hat - wX) ** 2).sum((1, 2))  # Eq. 13 / Eq. 16 through autograd
        mu, sigma = m.mu.view(K, -1, 1), m.sigma.view(K, -1, 1)
        s2 = sigma * sigma
        gmm_x = ((s * X - mu.detach()) ** 2 / s2.detach()).sum((1, 2))  # Eq. 13, the prior part
        dev2 = (s * X.detach() - mu) ** 2
        gmm_ms = ((dev2 / s2).sum(2) / Kel + torch.log(s2.squeeze(2))).sum(1)  # Eqs. 17-18
        term = 0.5 * lam * (recon + nu * (gmm_x + gmm_ms))
        total = term if total is None else total + term
    return total


class MemberFeatureLoss(nn.Module):
    """``BayesianFeatureLoss`` of K members, ``centers``/``log_var`` ``(K, M, D)``: ``forward(features
    (B, K, D), labels, theta (K,))`` -> ``(K,)``. The centre rule is the reference's ``_CenterLossGather``
    (members side by side in its feature dim); the centres' rate is in :class:`MemberSGD`."""

    def __init__(self, members: int, num_classes: int, dim: int) -> None:
        super().__init__()
        self.members, self.num_classes, self.dim = members, num_classes, dim
        self.centers = nn.Parameter(torch.zeros(members, num_classes, dim))
        self.log_var = nn.Parameter(torch.zeros(members, num_classes, dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        B, K, D = features.shape
        f = features.to(self.centers.dtype)
        labels = labels.long()
        side_by_side = self.centers.transpose(0, 1).reshape(self.num_classes, K * D)
        c = _CenterLossGather.apply(side_by_side, f.detach().reshape(B, K * D), labels).view(B, K, D)
        lv = self.log_var.index_select(1, labels).transpose(0, 1)  # (B, K, D)
        d2 = (f - c).square()
        per_sample = (d2 + d2 * torch.exp(-lv) + lv).sum(2)  # (B, K)
        return (0.5 * theta) * per_sample.mean(0)


# ============================================================================ stacked layers
def _cat(ts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if ts[0] is None else torch.cat([t.detach() for t in ts])


class _Member:
    """Mixin: ``member_state(k)`` = member k's tensors under the reference module's names."""

    members: int
    _per_member_dim0: tuple[str, ...] = ()  # tensors shaped (K, *reference shape); the others (K*n, ...)

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False)):
            if t.dim() == 0:  # num_batches_tracked: the same for every member
                out[name] = t.detach()
                continue
            own = t.detach().view(self.members, -1, *t.shape[1:])[k]
            out[name] = own.reshape(t.shape[1:]) if name in self._per_member_dim0 else own
        return out


class MultiConv2d(_Member, nn.Conv2d):
    """K full-precision convs: grouped (``groups=K``), or one wide conv when the input is the shared batch."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        c = convs[0]
        if c.groups != 1 or c.padding_mode != "zeros":
            raise NotImplementedError("multi_trial: only plain convs (groups=1, zero padding)")
        K = len(convs)
        super().__init__(K * c.in_channels, K * c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                         groups=K, bias=c.bias is not None)
        self.members, self.member_in = K, c.in_channels
        self.weight.data = _cat([m.weight for m in convs])
        if self.bias is not None:
            self.bias.data = _cat([m.bias for m in convs])

    def _kernel_for(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.members > 1 and x.shape[1] == self.member_in  # the image batch, same for all
        return F.conv2d(x, self._kernel_for(x), self.bias, self.stride, self.padding, self.dilation,
                        1 if shared else self.members)


class MultiBonnConv2d(MultiConv2d):
    """K ``BonnConv2d``: the input activations' sign with the layer's STE, then the members' kernels
    (:class:`_MemberBonnBinarize`) in one grouped conv."""

    _per_member_dim0 = ("w",)

    def __init__(self, convs: Sequence[BonnConv2d]) -> None:
        super().__init__(convs)
        c = convs[0]
        self.member_out = c.out_channels
        self.act_ste, self.act_clip, self.ste_clip = c.act_ste, c.act_clip, c.ste_clip
        self.w = nn.Parameter(torch.stack([m.w.detach() for m in convs]))
        self.mu = nn.Parameter(_cat([m.mu for m in convs]))
        self.sigma = nn.Parameter(_cat([m.sigma for m in convs]))

    def _kernel_for(self, x: torch.Tensor) -> torch.Tensor:
        return _MemberBonnBinarize.apply(self.weight, self.w, self.ste_clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(ACT_STES[self.act_ste].apply(x, self.act_clip))


class MultiBatchNorm2d(_Member, nn.BatchNorm2d):  # K*C channels: statistics per member by construction
    def __init__(self, bns: Sequence[nn.BatchNorm2d]) -> None:
        b = bns[0]
        super().__init__(len(bns) * b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats)
        self.members = len(bns)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(b, name) is not None:
                    getattr(self, name).copy_(_cat([getattr(m, name) for m in bns]))
            if b.num_batches_tracked is not None:
                self.num_batches_tracked.copy_(b.num_batches_tracked)


class MultiPReLU(_Member, nn.PReLU):
    def __init__(self, acts: Sequence[nn.PReLU]) -> None:
        if acts[0].num_parameters == 1:
            raise NotImplementedError("multi_trial: PReLU with one shared slope")
        super().__init__(len(acts) * acts[0].num_parameters)
        self.members = len(acts)
        self.weight.data = _cat([a.weight for a in acts])


class MultiLinear(_Member, nn.Module):
    """K linear layers as one batched matmul: ``(B, K*D)`` -> ``(B, K, O)``; weight ``(K, O, D)``."""

    _per_member_dim0 = ("weight", "bias")

    def __init__(self, fcs: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.members = len(fcs)
        self.weight = nn.Parameter(torch.stack([f.weight.detach() for f in fcs]))
        self.bias = nn.Parameter(torch.stack([f.bias.detach() for f in fcs])) if fcs[0].bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = x.reshape(x.shape[0], self.members, -1).transpose(0, 1)  # (K, B, D)
        wt = self.weight.transpose(1, 2)
        out = torch.bmm(xk, wt) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), xk, wt)
        return out.transpose(0, 1)


class MultiAvgPoolPad(nn.Module):
    """``AvgPoolPad`` with each member's channels padded on its own (members folded into the batch)."""

    def __init__(self, m: AvgPoolPad, members: int) -> None:
        super().__init__()
        self.inner, self.members = m, members

    def forward(self, x):
        B, _, H, W = x.shape
        out = self.inner(x.reshape(B * self.members, -1, H, W))
        return out.reshape(B, -1, *out.shape[2:])


_PASS = (nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.Hardtanh, nn.ReLU, nn.Dropout, nn.Sequential, nn.ModuleList)


def _stack_module(mods: Sequence[nn.Module]) -> nn.Module | None:
    """The stacked module of the members' modules at one name (None: keep the module as it is)."""
    m = mods[0]
    if isinstance(m, XnorConv2d):
        raise NotImplementedError("multi_trial: binarize='xnor' is not supported")
    for cls, multi in ((BonnConv2d, MultiBonnConv2d), (nn.Conv2d, MultiConv2d), (nn.BatchNorm2d, MultiBatchNorm2d),
                       (nn.PReLU, MultiPReLU), (nn.Linear, MultiLinear)):
        if isinstance(m, cls):
            out = multi(mods).train(m.training)
            out._backbone_conv = getattr(m, "_backbone_conv", False)
            return out
    if isinstance(m, AvgPoolPad):
        return MultiAvgPoolPad(m, len(mods))
    if isinstance(m, _PASS) or not (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))):
        return None
    raise NotImplementedError(f"multi_trial: cannot stack {type(m).__name__}")


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One model that runs the K ``models`` (same architecture) side by side; ``forward(x)`` returns
    ``(features (B, K*D), logits (B, K, O))``. The members' parameters are copied."""
    fused = copy.deepcopy(models[0])
    for name, _ in list(models[0].named_modules())[1:]:
        new = _stack_module([m.get_submodule(name) for m in models])
        if new is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(fused.get_submodule(parent) if parent else fused, leaf, new)
    fused.members = len(models)
    return fused


def member_state_dict(fused: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Member ``k`` of a stacked model as a ``state_dict`` of the reference model (copies)."""
    # every module with tensors of its own is a stacked one (_stack_module raises on anything else)
    return {f"{name}.{n}": t.clone() for name, mod in fused.named_modules() if isinstance(mod, _Member)
            for n, t in mod.member_state(k).items()}


# ============================================================================ optimiser
class MemberSGD:
    """The SGD of ``trainables.optim`` (momentum, no dampening or nesterov, weight decay added to the
    gradient) with lr / momentum / weight decay per role *and* member: ``coef`` ``(R, 3, K)`` on the device,
    written by the owner before each step. Each role's parameters become views of one flat buffer, their
    ``.grad`` views of another (autograd accumulates into them in place): a step is a few elementwise
    kernels per role whatever K, with no host sync. Parameters must be dense and member-major."""

    def __init__(self, roles: dict[str, list[nn.Parameter]], members: int) -> None:
        self.members, self.names = members, list(roles)
        first = next(p for ps in roles.values() for p in ps)
        self.coef = torch.zeros(len(roles), 3, members, device=first.device, dtype=first.dtype)
        self.flat, self.grad, self.buf, self.member_index = [], [], [], []
        for ps in roles.values():
            n_all = sum(p.numel() for p in ps)
            flat = torch.empty(n_all, device=first.device, dtype=first.dtype)
            grad = torch.zeros_like(flat)
            idx, off = [], 0
            for p in ps:
                n = p.numel()
                if n % members or p.stride(0) * p.shape[0] != n or not (
                        p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                    raise ValueError(f"MemberSGD: parameter {tuple(p.shape)} is not dense and member-major")
                p.data = torch.as_strided(flat, p.shape, p.stride(), off).copy_(p.detach())
                p.grad = torch.as_strided(grad, p.shape, p.stride(), off)
                idx.append(torch.arange(n, device=flat.device) // (n // members))
                off += n
            self.flat.append(flat), self.grad.append(grad), self.buf.append(torch.zeros_like(flat))
            self.member_index.append(torch.cat(idx))

    def zero_grad(self) -> None:
        torch._foreach_zero_(self.grad)

    @torch.no_grad()
    def step(self) -> None:
        for r, (flat, grad, buf, idx) in enumerate(zip(self.flat, self.grad, self.buf, self.member_index)):
            lr, mom, wd = self.coef[r].index_select(1, idx).unbind(0)
            buf.mul_(mom).add_(torch.addcmul(grad, wd, flat))  # d_p = g + wd p; buf = mom buf + d_p
            flat.addcmul_(lr, buf, value=-1.0)

    @torch.no_grad()
    def nonfinite_per_member(self) -> torch.Tensor:
        """``(K,)`` count of non-finite parameter elements of each member (on the device)."""
        return sum(self.flat[0].new_zeros(self.members).index_add_(0, idx, (~torch.isfinite(f)).to(f.dtype))
                   for f, idx in zip(self.flat, self.member_index))


# ============================================================================ trainer
class MultiTrainer:
    """``trainables.train.Trainer`` for a pack: ``train_step(x, y)`` steps every member on the same batch.

    ``cfgs``: one ``TrainConfig`` per member, equal in :data:`PACK_KEYS`; ``models``: the members'
    reference models (initialised from each member's seed, e.g. by :meth:`build`). Per member: ``lam``,
    ``nu``, ``theta``, ``feature_loss_start_epoch``, ``lr`` and its ratios, ``momentum``, the weight
    decays, ``center_lr``, the lr schedule, the init. ``set_active`` freezes members (lr 0)."""

    def __init__(self, cfgs: Sequence[TrainConfig], models: Sequence[nn.Module], num_classes: int,
                 device: torch.device, steps_per_epoch: int, amp: bool = False, channels_last: bool = False,
                 cuda_graph: bool = False, log: Callable[[str], None] | None = None) -> None:
        cfgs = [c if isinstance(c, TrainConfig) else TrainConfig.from_dict(c) for c in cfgs]
        for key in PACK_KEYS:
            if len({repr(getattr(c, key)) for c in cfgs}) > 1:
                raise ValueError(f"multi_trial: members must share {key!r} (got {[getattr(c, key) for c in cfgs]})")
        c0 = cfgs[0]
        if (c0.binarize, c0.optimizer, c0.mu_sigma_update) != ("bonn", "sgd", "sgd"):
            raise NotImplementedError("multi_trial: only binarize=bonn, optimizer=sgd, mu_sigma_update=sgd")
        K = self.members = len(cfgs)
        self.cfgs, self.device, self.amp, self.channels_last = cfgs, device, amp, channels_last
        self.model = stack_models(models).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.layers = [m for m in self.model.modules() if isinstance(m, MultiBonnConv2d)]
        self.feature_loss = MemberFeatureLoss(K, num_classes, models[0].feature_dim).to(device)

        self.lam, self.nu, self.theta = (torch.tensor([float(getattr(c, k)) for c in cfgs], device=device)
                                         for k in ("lam", "nu", "theta"))
        self.sigma_floor = torch.tensor([c.sigma_floor() for c in cfgs], device=device).view(K, 1)  # per member
        self.theta_on = torch.zeros(K, device=device)  # theta while a member's feature loss is on, else 0
        self.feature_on = [False] * K
        # roles and per-member group settings: trainables.optim's own groups of each member
        settings, role_of = [], {}
        for i, (c, m) in enumerate(zip(cfgs, models)):
            fl = BayesianFeatureLoss(num_classes, m.feature_dim, c.theta, c.center_lr)
            groups = build_param_groups(m, fl, c, log=None)
            settings.append({g["name"]: (g["lr"], g["momentum"], g["weight_decay"]) for g in groups})
            if i == 0:
                by_id = {id(p): g["name"] for g in groups for p in g["params"]}
                role_of = {n: by_id[id(p)] for n, p in m.named_parameters()}
                role_of.update({f"feature_loss.{n}": by_id[id(p)] for n, p in fl.named_parameters()})
        named = list(self.model.named_parameters()) + [(f"feature_loss.{n}", p)
                                                       for n, p in self.feature_loss.named_parameters()]
        roles: dict[str, list[nn.Parameter]] = {}
        for n, p in named:
            roles.setdefault(role_of[n], []).append(p)
        self.optimizer = MemberSGD(roles, K)
        self.base = torch.tensor([[[s[r][j] for s in settings] for j in range(3)] for r in roles],
                                 dtype=torch.float64)  # (R, 3, K): lr, momentum, weight decay
        self.scheduled = torch.tensor([r != "centers" for r in roles])
        self.centers_role = torch.tensor([r == "centers" for r in roles])
        self.factors = [LrFactor(c.schedule, c.epochs, steps_per_epoch, c.lr_milestones, c.lr_gamma,
                                 c.warmup_epochs) for c in cfgs]
        self.active = torch.ones(K, dtype=torch.float64)
        self.step_count = 0
        self.use_graph = bool(cuda_graph) and device.type == "cuda"
        self.captured = CapturedSteps(device, log, warmup=3)
        self._sums = torch.zeros(K, 4, device=device)  # loss, ce, kernel, feature (batch means) per member
        self._correct = torch.zeros(K, dtype=torch.long, device=device)
        self.reset_sums()

    @classmethod
    def build(cls, cfgs: Sequence[TrainConfig], in_channels: int, num_classes: int, image_size: int,
              **kw) -> "MultiTrainer":
        """Members' models built by ``trainables.models.build_model``, each after ``manual_seed(seed)``."""
        from ..models import build_model

        models = [(torch.manual_seed(c.seed), build_model(c, in_channels, num_classes, image_size))[1] for c in cfgs]
        return cls(cfgs, models, num_classes, **kw)

    # ------------------------------------------------------------------ per epoch / per member
    def set_epoch(self, epoch: int) -> None:
        """0-based; each member's feature loss is on from its ``feature_loss_start_epoch`` (if theta > 0)."""
        self.feature_on = [c.theta > 0 and epoch >= c.feature_loss_start_epoch for c in self.cfgs]
        on = torch.tensor(self.feature_on, dtype=self.theta.dtype, device=self.device)
        self.theta_on.copy_(self.theta * on)  # in place: a captured step reads it

    def set_active(self, active: Sequence[bool]) -> None:
        """Freeze (False) or thaw members: a frozen member's learning rates are 0 (it still runs)."""
        self.active = torch.tensor([float(bool(a)) for a in active], dtype=torch.float64)

    def _write_coefficients(self) -> None:
        f = torch.tensor([lf(self.step_count) for lf in self.factors], dtype=torch.float64)
        on = torch.tensor([float(x) for x in self.feature_on], dtype=torch.float64)
        coef = self.base.clone()
        coef[self.scheduled, 0] *= f
        coef[self.centers_role, 0] *= on  # the centres move only while the feature loss is on
        coef[:, 0] *= self.active
        self.optimizer.coef.copy_(coef)

    def reset_sums(self) -> None:
        self._sums.zero_(), self._correct.zero_()
        self._steps = self._seen = 0

    def read_sums(self) -> list[dict[str, float]]:
        """Per member: means over the steps since ``reset_sums`` (one host sync)."""
        vals, correct = self._sums.tolist(), self._correct.tolist()
        n = max(self._steps, 1)
        return [{"train_loss": v[0] / n, "ce_loss": v[1] / n, "kernel_loss": v[2] / n, "feature_loss": v[3] / n,
                 "train_acc": c / max(self._seen, 1)} for v, c in zip(vals, correct)]

    def finite_members(self) -> list[bool]:
        """Per member: losses so far and parameters all finite (one host sync)."""
        return (torch.isfinite(self._sums).all(1) & (self.optimizer.nonfinite_per_member() == 0)).tolist()

    # ------------------------------------------------------------------ one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimiser step of every member on ``(x, y)`` (eager, or a replayed CUDA graph)."""
        self._write_coefficients()
        if self.use_graph:
            key = (tuple(x.shape), x.dtype, tuple(y.shape))
            if not self.captured.run(key, x, y, self._step, self.optimizer.zero_grad):
                self.use_graph = False
                self._step(x, y)
        else:
            self._step(x, y)
        self.step_count, self._steps, self._seen = self.step_count + 1, self._steps + 1, self._seen + int(y.shape[0])

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Forward, per-member losses, backward of their sum, the step, the clamps, the sums (no sync)."""
        self.optimizer.zero_grad()
        feats, logits = self._forward(x)
        B, K = y.shape[0], self.members
        ce = self._ce(logits, y).mean(0)
        kl = member_kernel_loss(self.layers, self.lam, self.nu)
        fl = self.feature_loss(feats.float().view(B, K, -1), y, self.theta_on)
        per_member = ce + kl + fl
        per_member.sum().backward()  # members share no parameter: each gets its own member's gradient
        self.optimizer.step()
        clamp_prior_(self.layers)  # mu, sigma >= 1e-8, then each member's own sigma floor
        for v in (m.sigma.detach().view(K, -1) for m in self.layers):
            torch.maximum(v, self.sigma_floor, out=v)
        with torch.no_grad():
            self._sums += torch.stack([per_member, ce, kl, fl], 1).detach()
            self._correct += (logits.detach().argmax(2) == y[:, None]).sum(0)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=not self.use_graph):
            return self.model(x)

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each sample and member ``(B, K)`` from logits ``(B, K, O)``."""
        B, K = logits.shape[:2]
        yk = y[:, None].expand(B, K).reshape(-1)
        return F.cross_entropy(logits.float().reshape(B * K, -1), yk, reduction="none").view(B, K)

    # ------------------------------------------------------------------ evaluation and members
    @torch.no_grad()
    def evaluate(self, batches) -> list[tuple[float, float]]:
        """Per member ``(mean cross-entropy, accuracy)`` over ``batches`` (one host sync)."""
        self.model.eval()
        loss, correct, n = torch.zeros(self.members, device=self.device), torch.zeros_like(self._correct), 0
        for x, y in batches:
            logits = self._forward(x)[1]
            loss += self._ce(logits, y).sum(0)
            correct += (logits.argmax(2) == y[:, None]).sum(0)
            n += int(y.shape[0])
        self.model.train()
        return [(lo / max(n, 1), c / max(n, 1)) for lo, c in zip(loss.tolist(), correct.tolist())]

    def member_state_dict(self, k: int) -> dict[str, dict[str, torch.Tensor]]:
        """Member ``k`` as the reference's ``{"model": ..., "feature_loss": ...}`` state dicts (copies)."""
        c = self.cfgs[k]
        return {"model": member_state_dict(self.model, k),
                "feature_loss": {"centers": self.feature_loss.centers[k].detach().clone(),
                                 "log_var": self.feature_loss.log_var[k].detach().clone(),
                                 "_extra_state": {"theta": c.theta, "center_lr": c.center_lr}}}
