"""Binarizers: sign, straight-through estimators, the BONN and XNOR weight binarizers.

Every binarizer is a ``torch.autograd.Function`` whose docstring states its forward formula, its
pseudo-gradient (what ``backward`` returns) and where it comes from. Conventions (docs/bnn-practice.md
B1/B7):

* ``sign`` never returns 0: ``sign(x) = +1 if x >= 0 else -1`` (larq ``math.sign`` semantics;
  ``torch.sign(0) == 0`` would produce a zero "bit"). This also matches BONN's split of a kernel into
  the "+" set ``X >= 0`` and the "-" set ``X < 0`` (its mu gradient).
* The clipped straight-through estimator (hard-tanh STE) passes the incoming gradient where
  ``|x| <= 1`` and zeroes it elsewhere (BNN, Courbariaux et al. 2016; larq ``ste_sign``).

References: BONN = Gu et al., "Bayesian Optimized 1-Bit CNNs", ICCV 2019, arXiv 1908.06314.
Bi-Real Net = Liu et al., ECCV 2018, arXiv 1808.00278. XNOR-Net = Rastegari et al., ECCV 2016,
arXiv 1603.05279.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "ACT_STES",
    "ApproxSignSTE",
    "BonnWeightBinarize",
    "SignSTE",
    "XnorWeightBinarize",
    "binarize_activation",
    "bonn_binarize",
    "clipped_grad",
    "sign",
    "sign_traceable",
    "xnor_binarize",
]


_PLUS_MINUS_ONE: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _plus_minus_one(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached 0-dim ``(+1, -1)`` of ``x``'s dtype and device (saves two tiny kernels per call)."""
    key = (x.dtype, x.device)
    pm = _PLUS_MINUS_ONE.get(key)
    if pm is None:
        one = torch.ones((), dtype=x.dtype, device=x.device)
        pm = _PLUS_MINUS_ONE[key] = (one, -one)
    return pm


def sign_traceable(x: torch.Tensor) -> torch.Tensor:
    """:func:`sign` in the form ``torch.compile`` traces into one kernel (same values)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def sign(x: torch.Tensor) -> torch.Tensor:
    """Sign that is never zero: ``+1`` where ``x >= 0`` (``-0.0`` included), ``-1`` elsewhere.

    Same dtype and device as ``x``. Not differentiable by itself (use :class:`SignSTE`).
    """
    if torch.compiler.is_compiling():
        return sign_traceable(x)
    one, minus_one = _plus_minus_one(x)
    return torch.where(x >= 0, one, minus_one)


def _clip_hi(dtype: torch.dtype, clip: float = 1.0) -> float:
    # The smallest value above ``clip`` in the precision the comparison runs in (float64, else float32
    # opmath), so that hardtanh_backward's exclusive test |x| < hi is exactly |x| <= clip.
    if dtype == torch.float64:
        return math.nextafter(float(clip), math.inf)
    return float(np.nextafter(np.float32(clip), np.float32(np.inf)))


def clipped_grad(grad: torch.Tensor, x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """``grad * 1{|x| <= clip}`` in one kernel (``aten.hardtanh_backward`` with bounds just beyond +-clip)."""
    hi = _clip_hi(x.dtype, clip)
    return torch.ops.aten.hardtanh_backward(grad, x, -hi, hi)


class SignSTE(torch.autograd.Function):
    """Activation binarizer with the clipped straight-through estimator.

    Forward:  ``y = sign(x)`` (``sign(0) = +1``).
    Backward: ``dL/dx = dL/dy * 1{|x| <= c}`` (hard-tanh STE; ``c`` = ``clip``, default 1, config
    ``act_clip``).

    ``sign_fn``: the implementation of the forward sign (default :func:`sign`; a ``Trainer`` with
    ``fused_bonn: compiled`` passes a compiled one with the same values to its own layers).

    Source: BNN (Courbariaux et al. 2016, arXiv 1602.02830); the BONN first author's CUDA extension
    (jxgu1016/BinActivateFunc_PyTorch) uses the same rule for activations.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float = 1.0, sign_fn=None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = float(clip)
        return sign(x) if sign_fn is None else sign_fn(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return clipped_grad(grad_out, x, ctx.clip), None, None


class ApproxSignSTE(SignSTE):
    """Activation binarizer with Bi-Real Net's ApproxSign pseudo-gradient.

    Forward:  ``y = sign(x)`` (``sign(0) = +1``; :class:`SignSTE`'s forward).
    Backward: ``dL/dx = dL/dy * (2/c - 2|x|/c^2) * 1{|x| <= c}`` (derivative of the piecewise quadratic
    ApproxSign of Bi-Real Net stretched to [-c, c]; ``c = 1`` is larq's ``approx_sign``).
    """

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        c = ctx.clip
        return grad_out * (2.0 / c - (2.0 / (c * c)) * x.abs()).clamp_(min=0.0), None, None


#: Names accepted by :func:`binarize_activation` (``act_ste`` of the binary conv layers).
ACT_STES = {"clipped": SignSTE, "approx_sign": ApproxSignSTE}


def binarize_activation(x: torch.Tensor, act_ste: str = "clipped", clip: float = 1.0) -> torch.Tensor:
    """``sign(x)`` with the pseudo-gradient named by ``act_ste`` (``"clipped"`` | ``"approx_sign"``)."""
    try:
        fn = ACT_STES[act_ste]
    except KeyError:
        raise ValueError(f"act_ste: must be one of {sorted(ACT_STES)} (got {act_ste!r})") from None
    return fn.apply(x, clip)


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over its leading dimensions so that it has the trailing ``shape``."""
    lead = t.dim() - len(shape)
    return t.sum(dim=tuple(range(lead))) if lead > 0 else t


class BonnWeightBinarize(torch.autograd.Function):
    """BONN weight binarizer with the asynchronous modulation vector ``w`` (Alg. 1 line 5).

    Inputs: latent kernel ``X`` of shape ``(C_out, C_in, k, k)`` and modulation ``w`` whose shape is a
    trailing part of ``X``'s (``(k, k)`` or ``(C_in, k, k)``), shared by all kernels of the layer.

    Forward:  ``X_hat = mean(w) * sign(X)`` — every element of ``w`` is replaced by the average of
    all elements, so inference needs one scalar per layer.

    Backward (the full ``w``, not its mean, is used, "asynchronously" with the forward pass), with
    ``G = dL_S/dX_hat`` and ``M = 1{-1 <= w * X <= 1}`` (``w`` broadcast over all kernels; the bound 1 is
    the paper's, ``clip`` = config ``ste_clip`` generalises it to ``|w X| <= clip``):

    * BONN Eq. 12: ``dL_S/dX = G * M * w``.
    * BONN Eq. 15: ``dL_S/dw = sum over all kernels i (and input channels n when w is (k, k)) of
      G * M * X``, i.e. reduced to ``w``'s shape.

    Note that no gradient flows through ``mean(w)`` in the forward formula: the w rule above replaces it.
    """

    @staticmethod
    def forward(ctx, X: torch.Tensor, w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
        ctx.save_for_backward(X, w)
        ctx.clip = float(clip)
        wbar = w.mean()
        if wbar.dtype != X.dtype:
            wbar = wbar.to(X.dtype)
        return torch.where(X >= 0, wbar, -wbar)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        X, w = ctx.saved_tensors
        gX = gw = None
        gm = clipped_grad(grad_out, w * X, ctx.clip)  # G * 1{-1 <= w X <= 1}
        if ctx.needs_input_grad[0]:
            gX = gm * w
        if ctx.needs_input_grad[1]:
            gw = _reduce_to(gm * X, w.shape)
        return gX, gw, None


def bonn_binarize(X: torch.Tensor, w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Functional form of :class:`BonnWeightBinarize`."""
    return BonnWeightBinarize.apply(X, w, clip)


class XnorWeightBinarize(torch.autograd.Function):
    """XNOR-Net / Bi-Real weight binarizer with a per-output-channel scale.

    Forward:  ``W_b = alpha * sign(W)`` with ``alpha_o = mean(|W_o|)`` over ``(C_in, k, k)`` of
    output channel ``o`` (XNOR-Net's BWN scale per filter; ReActNet/Bi-Real ``HardBinaryConv``).

    Backward: ``dL/dW = dL/dW_b * alpha * 1{|W| <= c}`` (``c`` = ``clip``, default 1, config
    ``ste_clip``) — ``alpha`` is a detached constant (no
    gradient through the scale, as in Bi-Real ``scaling_factor.detach()`` and larq
    ``MagnitudeAwareSign``) and ``sign`` uses the clipped STE on the latent weight.
    """

    @staticmethod
    def forward(ctx, W: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
        dims = tuple(range(1, W.dim()))
        alpha = W.abs().mean(dim=dims, keepdim=True)
        ctx.save_for_backward(W, alpha)
        ctx.clip = float(clip)
        return torch.where(W >= 0, alpha, -alpha)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        W, alpha = ctx.saved_tensors
        return clipped_grad(grad_out, W, ctx.clip) * alpha, None


def xnor_binarize(W: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Functional form of :class:`XnorWeightBinarize`: ``mean|W_o| * sign(W)`` per output channel."""
    return XnorWeightBinarize.apply(W, clip)
