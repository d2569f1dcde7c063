"""Binary convolution layers: BONN's ``BonnConv2d``, the XNOR baseline ``XnorConv2d`` and a factory.

Both binary layers binarize their input activations with :class:`~trainables.binarize.SignSTE`
(``act_ste="clipped"``, the default) or :class:`~trainables.binarize.ApproxSignSTE`
(``act_ste="approx_sign"``) and their weights with the binarizer of the method; they subclass
``nn.Conv2d`` so that ``weight``/``bias``/``stride``/``padding`` and ``isinstance(m, nn.Conv2d)`` work as
usual. Which layers stay full precision (stem, 1x1 shortcuts, FC) is the model's business.

Choices the paper leaves open ([I], see docs/bonn-method.md sections 1, 3, 4 and 9):

* ``weight`` (latent kernels ``X``): normal with ``std = init_scale * sqrt(2 / (C_in k k))`` (Kaiming,
  fan-in, ReLU gain, times ``init_scale``; config ``latent_init_scale``). The scale of ``X`` sets how
  fast signs flip: the forward pass sees only ``sign(X)`` and a BN follows, so the gradient reaching
  ``X`` does not grow as ``|X|`` shrinks and a step moves ``X`` by a fraction ``~ lr / |X|`` of its
  size. The paper's Fig. 3 shows first-layer latent weights within about +-0.03 at epoch 0 (16 input
  channels: Kaiming std 0.118, so ``init_scale`` about 0.1-0.25).
* ``w`` (modulation): shape ``(k, k)`` (``w_shape="kxk"``, the book's reading) or ``(C_in, k, k)``
  (``w_shape="cin_kxk"``), filled with a constant: ``mean|X|`` of the layer (``w_init="mean_abs"``,
  the forward kernel then has the latent kernel's mean magnitude) or a given number (config
  ``w_init``; the paper's Fig. 5 shows ``mean(w)`` between 0.05 and 0.23 with ``|X|`` near 0.01).
* ``mu``, ``sigma`` (per output filter, shape ``(C_out,)``): ``mu_i = mean|X_i|`` and
  ``sigma_i = sqrt(mean(|X_i| - mu_i)^2)`` over the ``C_in k k`` elements of filter ``i`` — the exact
  minimisers of the kernel loss (bonn-method.md section 2.3), instead of the literal "average of X"
  (which is about 0).

A model must not re-initialise ``weight`` of a ``BonnConv2d`` behind its back; if it does, it must
call :meth:`BonnConv2d.reset_prior_` afterwards (``reset_parameters`` re-initialises everything).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from .binarize import ACT_STES, BonnWeightBinarize, XnorWeightBinarize, sign

__all__ = [
    "BINARIZE_MODES",
    "W_SHAPES",
    "BonnConv2d",
    "XnorConv2d",
    "bonn_layers",
    "bonn_parameter_roles",
    "make_conv",
    "precomputed_kernels",
    "set_activation_sign",
]

W_SHAPES = ("kxk", "cin_kxk")
BINARIZE_MODES = ("bonn", "xnor", "none")


def _check_act_ste(act_ste: str) -> str:
    if act_ste not in ACT_STES:
        raise ValueError(f"act_ste: must be one of {sorted(ACT_STES)} (got {act_ste!r})")
    return act_ste


class BonnConv2d(nn.Conv2d):
    """Binary conv of BONN: ``conv2d(sign(a), mean(w) * sign(X))`` (Alg. 1 lines 5-7).

    Parameters (all ``nn.Parameter``):

    * ``weight`` — latent full-precision kernels ``X``, ``(C_out, C_in, k, k)``;
    * ``w`` — modulation vector, ``(k, k)`` or ``(C_in, k, k)``, shared by all kernels of the layer;
      only its mean is used in the forward pass, the full ``w`` in backward (``BonnWeightBinarize``);
    * ``mu``, ``sigma`` — per-output-filter mean and std of the two-mode Gaussian prior ``±mu``
      (``(C_out,)``); they only enter the Bayesian kernel loss (``trainables.losses``).

    ``bias`` defaults to ``False`` (a BatchNorm follows every binary conv in our models).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        w_shape: str = "kxk",
        act_ste: str = "clipped",
        init_scale: float = 1.0,
        w_init: float | str = "mean_abs",
        ste_clip: float = 1.0,
        act_clip: float = 1.0,
    ) -> None:
        if w_shape not in W_SHAPES:
            raise ValueError(f"w_shape: must be one of {list(W_SHAPES)} (got {w_shape!r})")
        _check_act_ste(act_ste)
        k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
        # Plain attributes set before nn.Conv2d.__init__, which calls reset_parameters().
        object.__setattr__(self, "w_shape", w_shape)
        object.__setattr__(self, "act_ste", act_ste)
        object.__setattr__(self, "init_scale", float(init_scale))
        object.__setattr__(self, "w_init", w_init)
        object.__setattr__(self, "ste_clip", float(ste_clip))
        object.__setattr__(self, "act_clip", float(act_clip))
        object.__setattr__(self, "_w_init_shape", tuple(k) if w_shape == "kxk" else (in_channels, *k))
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._kernel: torch.Tensor | None = None  # set by precomputed_kernels() for one forward
        self.act_sign = None  # the activations' sign implementation (None: binarize.sign); set_activation_sign

    def reset_parameters(self) -> None:
        """Scaled Kaiming-normal ``weight``; ``w`` = ``mean|X|`` or ``w_init``; ``mu``/``sigma`` = moments
        of ``|X_i|``."""
        if not hasattr(self, "w"):
            self.w = nn.Parameter(torch.empty(self._w_init_shape))
            self.mu = nn.Parameter(torch.empty(self.out_channels))
            self.sigma = nn.Parameter(torch.empty(self.out_channels))
        _scaled_kaiming_(self.weight, self.init_scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.w.fill_(self.weight.abs().mean() if self.w_init == "mean_abs" else float(self.w_init))
        self.reset_prior_()

    @torch.no_grad()
    def reset_prior_(self, eps: float = 1e-8) -> None:
        """``mu_i = mean|X_i|``, ``sigma_i = sqrt(mean(|X_i| - mu_i)^2)`` (clamped to ``>= eps``)."""
        a = self.weight.detach().abs().flatten(1)
        std, mean = torch.std_mean(a, dim=1, correction=0)
        self.mu.copy_(mean)
        self.sigma.copy_(std.clamp_min(eps))

    def binary_kernel(self) -> torch.Tensor:
        """The effective (forward) kernel ``mean(w) * sign(X)``, detached."""
        with torch.no_grad():
            return self.w.mean() * sign(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = _binarize_input(self, x)
        kernel = self._kernel
        if kernel is None:
            kernel = BonnWeightBinarize.apply(self.weight, self.w, self.ste_clip)
        return self._conv_forward(xb, kernel, self.bias)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", w_shape={self.w_shape}, act_ste={self.act_ste}, "
                f"init_scale={self.init_scale:g}, w_init={self.w_init}, ste_clip={self.ste_clip:g}, "
                f"act_clip={self.act_clip:g}")


class XnorConv2d(nn.Conv2d):
    """XNOR-Net-style binary conv: ``conv2d(sign(a), mean|W_o| * sign(W))`` per output channel ``o``.

    Activations binarized without a scale (no XNOR ``K`` map, bnn-practice.md B2/B7); weight scale
    detached, clipped STE on the latent weight (:class:`~trainables.binarize.XnorWeightBinarize`).
    ``w_shape`` is accepted for signature compatibility with :class:`BonnConv2d` and ignored.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        w_shape: str = "kxk",
        act_ste: str = "clipped",
        init_scale: float = 1.0,
        ste_clip: float = 1.0,
        act_clip: float = 1.0,
    ) -> None:
        _check_act_ste(act_ste)
        object.__setattr__(self, "init_scale", float(init_scale))
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.act_ste = act_ste
        self.ste_clip, self.act_clip = float(ste_clip), float(act_clip)
        self.act_sign = None  # as in BonnConv2d

    def reset_parameters(self) -> None:
        _scaled_kaiming_(self.weight, self.init_scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def binary_kernel(self) -> torch.Tensor:
        """The effective (forward) kernel ``mean|W_o| * sign(W)``, detached."""
        with torch.no_grad():
            return self.weight.abs().mean(dim=(1, 2, 3), keepdim=True) * sign(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = _binarize_input(self, x)
        return self._conv_forward(xb, XnorWeightBinarize.apply(self.weight, self.ste_clip), self.bias)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", act_ste={self.act_ste}, init_scale={self.init_scale:g}, "
                f"ste_clip={self.ste_clip:g}, act_clip={self.act_clip:g}")


def _binarize_input(conv: BonnConv2d | XnorConv2d, x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` of a binary conv's input, with the layer's pseudo-gradient and sign implementation."""
    return ACT_STES[conv.act_ste].apply(x, conv.act_clip, conv.act_sign)  # act_sign None: binarize.sign


def set_activation_sign(module: nn.Module, sign_fn) -> None:
    """Use ``sign_fn`` (same values as :func:`trainables.binarize.sign`; ``None``: that one) for the input
    activations of every binary conv in ``module``. Per model: other models in the process are untouched."""
    for m in module.modules():
        if isinstance(m, (BonnConv2d, XnorConv2d)):
            m.act_sign = sign_fn


def _scaled_kaiming_(weight: torch.Tensor, scale: float) -> None:
    """Kaiming-normal (fan-in, ReLU gain) times ``scale``: ``std = scale * sqrt(2 / fan_in)``."""
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
    if scale != 1.0:
        with torch.no_grad():
            weight.mul_(scale)


def make_conv(
    binarize: str,
    in_ch: int,
    out_ch: int,
    k: int,
    stride: int = 1,
    padding: int = 0,
    **kw,
) -> nn.Conv2d:
    """Build the conv for ``binarize`` in ``{"bonn", "xnor", "none"}``.

    ``kw``: ``bias`` (default ``False`` for all three), ``w_shape`` and ``w_init`` (BONN only),
    ``act_ste``, ``init_scale``, ``ste_clip``, ``act_clip`` (binary layers only). ``"none"`` returns a
    plain ``nn.Conv2d`` (Kaiming-normal fan-in init, like the binary layers at ``init_scale=1``) and
    ignores the binary-only keywords.
    """
    bias = kw.pop("bias", False)
    w_shape = kw.pop("w_shape", "kxk")
    act_ste = kw.pop("act_ste", "clipped")
    binary_kw = {k: kw.pop(k) for k in ("init_scale", "ste_clip", "act_clip") if k in kw}
    w_init = kw.pop("w_init", "mean_abs")
    if kw:
        raise TypeError(f"make_conv: unexpected keyword arguments {sorted(kw)}")
    if binarize == "bonn":
        return BonnConv2d(in_ch, out_ch, k, stride, padding, bias=bias, w_shape=w_shape, act_ste=act_ste,
                          w_init=w_init, **binary_kw)
    if binarize == "xnor":
        return XnorConv2d(in_ch, out_ch, k, stride, padding, bias=bias, act_ste=act_ste, **binary_kw)
    if binarize == "none":
        conv = nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=padding, bias=bias)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        return conv
    raise ValueError(f"binarize: must be one of {list(BINARIZE_MODES)} (got {binarize!r})")


def bonn_layers(module: nn.Module) -> list[BonnConv2d]:
    """All :class:`BonnConv2d` in ``module`` (itself included), in ``module.modules()`` order."""
    return [m for m in module.modules() if isinstance(m, BonnConv2d)]


def bonn_parameter_roles(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """BONN parameters of ``module`` by role, for building optimizer groups.

    Keys: ``"latent"`` (``weight`` X: normal lr, weight decay), ``"modulation"`` (``w``: slow lr, no
    weight decay), ``"mu"`` (normal lr, no weight decay), ``"sigma"`` (slow lr, no weight decay).
    Paper (ResNet-18): lr 0.1 for X and mu, 0.01 for w and sigma.
    """
    layers = bonn_layers(module)
    return {
        "latent": [m.weight for m in layers],
        "modulation": [m.w for m in layers],
        "mu": [m.mu for m in layers],
        "sigma": [m.sigma for m in layers],
    }


@contextlib.contextmanager
def precomputed_kernels(layers: Sequence[BonnConv2d], kernels: Sequence[torch.Tensor]) -> Iterator[None]:
    """Make each layer's next forward use the given kernel instead of binarizing its own weight.

    The kernels come from the fused path, ``trainables.fast.fused.bonn_kernels_and_loss`` (all layers
    binarized in one autograd node, with the same forward values and gradients as
    :class:`BonnWeightBinarize`); this module does not import it.
    """
    for m, k in zip(layers, kernels, strict=True):
        m._kernel = k
    try:
        yield
    finally:
        for m in layers:
            m._kernel = None
