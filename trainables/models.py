"""Models by name: ``wrn22``, ``resnet18``, ``small_cnn``.

Every model's ``forward(x)`` returns ``(features, logits)``: ``features`` is the input of the final
fully-connected layer (the globally pooled penultimate feature), the tensor the Bayesian feature loss
(``trainables.losses.BayesianFeatureLoss``) acts on (bonn-method.md §3, choice [I] 9).

Full precision / binary split (BONN §3.5, following XNOR-Net and Bi-Real Net; bnn-practice.md B3/B7):
the first conv, every 1x1 shortcut conv, BatchNorm, PReLU and the final ``Linear`` are full precision;
every 3x3 backbone conv is built by ``trainables.layers.make_conv(binarize, ...)``, i.e. a
``BonnConv2d`` (``binarize="bonn"``), an ``XnorConv2d`` (``"xnor"``) or a plain ``nn.Conv2d``
(``"none"``, the full-precision baseline with exactly the same topology). Those 3x3 convs are marked
``_backbone_conv = True`` and listed, in forward order, by :func:`backbone_convs`.

Block layouts (the paper gives Fig. 2, ``BN -> Conv -> PReLU (+ shortcut)``, and leaves the rest open
[U]; our choices follow bnn-practice.md: BN right after every binary conv, a real-valued shortcut):

``wrn22``  WRN-22 with depth factor k=1 (paper §3.1.2): a full-precision 3x3 stem conv to ``width``
    channels, then 3 groups x 3 pre-activation basic blocks with ``width, 2*width, 4*width`` channels
    (``width=16`` -> 16-16-32-64, ``width=64`` -> 64-64-128-256), strides 1, 2, 2. One block::

        o = bn0(x)                       # pre-activation: per-channel threshold before the sign
        o = act1(bn1(conv1_3x3(o)))      # conv1 binarizes its input with sign inside the layer
        o = dropout(o)
        o = act2(bn2(conv2_3x3(o)))
        out = o + shortcut(x)            # identity, or FP 1x1 conv / avgpool+zero-pad on a shape change

    18 binary 3x3 convs (3 x 3 x 2); with the stem, the FC and the two 1x1 shortcut convs that is the
    22 layers of the name. Head: BN -> PReLU -> global average pool -> (features) -> FC.
    ``block_style="bireal_per_conv"`` puts a real-valued shortcut around each binary conv instead
    (``WRNBiRealBlock``; Bi-Real Net, which the paper follows for ResNet-18).

``resnet18`` CIFAR ResNet-18: FP 3x3 stem conv + BN + activation, no max-pool, stages [2, 2, 2, 2]
    with ``width * (1, 2, 4, 8)`` channels, strides 1, 2, 2, 2; 16 binary 3x3 convs. Block styles:

    * ``bireal_per_conv`` (default, Bi-Real Net): a real-valued shortcut around every binary conv,
      ``o1 = PReLU(BN(conv1(x)) + shortcut(x)); out = PReLU(BN(conv2(o1)) + o1)``;
    * ``two_conv_hardtanh`` (IR-Net / RBNN / ReCU family): ``o = hardtanh(BN(conv1(x)));
      out = hardtanh(BN(conv2(o)) + shortcut(x))``.

    Downsample shortcut ``fp_1x1``: FP 1x1 conv (stride 2) + BN; ``avgpool_pad``: parameter-free
    2x2 average pool + zero channel padding. Head: global average pool -> (features) -> dropout -> FC.

``small_cnn`` for 1x8x8 (digits), 1x28x28 (MNIST, Fashion-MNIST) and 3x32x32 (CIFAR) inputs: FP 3x3
    stem conv (``width`` channels) + BN + PReLU, a 2x2 max-pool when the input is >= 16 px, then
    binary 3x3 units ``conv -> BN -> PReLU``: ``width -> 2*width`` + max-pool, ``2*width -> 2*width``
    with a real-valued (Bi-Real) shortcut, and for inputs >= 16 px a third one ``2*width -> 4*width``
    with stride 2 (2 binary convs for 8x8 inputs, 3 otherwise). Head: global average pool ->
    (features) -> dropout -> FC.

FP convs are initialised with Kaiming-normal (fan_out), the FC with PyTorch's default; binary convs
keep the initialisation of ``trainables.layers`` (latent weights, ``w``, ``mu``, ``sigma``, Alg. 1 line 1).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig

__all__ = ["MODELS", "build_model", "register_model", "backbone_convs", "conv_options", "WRN22", "ResNet18",
           "SmallCNN"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(builder):
        MODELS[name] = builder
        return builder
    return deco


def build_model(cfg: TrainConfig | Mapping[str, Any], in_channels: int, num_classes: int,
                image_size: int) -> nn.Module:
    """Build the model named by ``cfg.model`` for ``in_channels x image_size x image_size`` inputs."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_dict(cfg)
    model = MODELS[cfg.model](cfg, in_channels=in_channels, num_classes=num_classes,
                              image_size=image_size)
    model.model_meta = {"in_channels": in_channels, "num_classes": num_classes,
                        "image_size": image_size}
    return model


def backbone_convs(model: nn.Module) -> list[nn.Module]:
    """The 3x3 backbone convs (binary unless ``binarize="none"``), in forward order."""
    return [m for m in model.modules() if getattr(m, "_backbone_conv", False)]


# --------------------------------------------------------------------------- building blocks
def conv_options(cfg: TrainConfig) -> dict[str, Any]:
    """The binary-conv options of a config (``trainables.layers.make_conv`` keywords)."""
    return {"init_scale": cfg.latent_init_scale, "w_init": cfg.w_init, "ste_clip": cfg.ste_clip,
            "act_clip": cfg.act_clip}


def _binary_conv(binarize: str, cin: int, cout: int, stride: int = 1,
                 conv_kw: Mapping[str, Any] | None = None) -> nn.Module:
    from .layers import make_conv  # imported late: layers.py is a sibling module

    conv = make_conv(binarize, cin, cout, 3, stride, 1, **dict(conv_kw or {}))
    conv._backbone_conv = True
    return conv


def _fp_conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class AvgPoolPad(nn.Module):
    """Parameter-free downsample shortcut: ``avg_pool2d(x, stride)`` then zero channel padding."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin
        if self.extra < 0:
            raise ValueError(f"avgpool_pad shortcut cannot reduce channels ({cin} -> {cout})")

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True, count_include_pad=False)
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


def _shortcut(kind: str, cin: int, cout: int, stride: int, with_bn: bool) -> nn.Module:
    if cin == cout and stride == 1:
        return nn.Identity()
    if kind == "avgpool_pad":
        return AvgPoolPad(cin, cout, stride)
    conv = _fp_conv(cin, cout, 1, stride)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if with_bn else conv


class _Classifier(nn.Module):
    """Base class: ``forward`` returns ``(features, logits)``; ``feature_dim`` = FC input size."""

    feature_dim: int

    def forward_features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        f = self.forward_features(x)
        return f, self.fc(self.drop(f))


# --------------------------------------------------------------------------- WRN-22
class WRNBlock(nn.Module):
    """``preact``: one shortcut around the pair of binary convs (module docstring)."""

    def __init__(self, cin, cout, stride, binarize, shortcut, dropout, conv_kw=None):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin)
        self.conv1 = _binary_conv(binarize, cin, cout, stride, conv_kw)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.PReLU(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _binary_conv(binarize, cout, cout, 1, conv_kw)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.PReLU(cout)
        self.shortcut = _shortcut(shortcut, cin, cout, stride, with_bn=False)

    def forward(self, x):
        o = self.act1(self.bn1(self.conv1(self.bn0(x))))
        o = self.act2(self.bn2(self.conv2(self.drop(o))))
        return o + self.shortcut(x)


class WRNBiRealBlock(WRNBlock):
    """``bireal_per_conv``: a real-valued shortcut around *each* binary conv (Bi-Real Net, the paper's
    "network modifications" for ResNet-18, applied to WRN-22)::

        o = bn0(x)                                  # per-channel threshold before the sign
        o1 = act1(bn1(conv1(o))) + shortcut(x)      # shortcut: identity, FP 1x1 + BN or avgpool-pad
        out = act2(bn2(conv2(drop(bn_mid(o1))))) + o1
    """

    def __init__(self, cin, cout, stride, binarize, shortcut, dropout, conv_kw=None):
        super().__init__(cin, cout, stride, binarize, shortcut, dropout, conv_kw)
        self.bn_mid = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(shortcut, cin, cout, stride, with_bn=True)

    def forward(self, x):
        o1 = self.act1(self.bn1(self.conv1(self.bn0(x)))) + self.shortcut(x)
        return self.act2(self.bn2(self.conv2(self.drop(self.bn_mid(o1))))) + o1


class WRN22(_Classifier):
    depth = 22

    def __init__(self, in_channels, num_classes, width=16, binarize="bonn", shortcut="fp_1x1",
                 dropout=0.0, block_style="preact", conv_kw=None):
        super().__init__()
        block = {"preact": WRNBlock, "bireal_per_conv": WRNBiRealBlock}[block_style]
        n = (self.depth - 4) // 6  # 3 blocks per group
        widths = [width, 2 * width, 4 * width]
        self.stem = _fp_conv(in_channels, width, 3, 1, 1)
        blocks, cin = [], width
        for g, (cout, stride) in enumerate(zip(widths, (1, 2, 2))):
            for b in range(n):
                blocks.append(block(cin, cout, stride if b == 0 else 1, binarize, shortcut, dropout, conv_kw))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.PReLU(cin)
        self.feature_dim = cin
        self.drop = nn.Identity()  # WRN's dropout sits inside the blocks
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        x = self.act(self.bn(self.blocks(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@register_model("wrn22")
def _wrn22(cfg, in_channels, num_classes, image_size):
    return WRN22(in_channels, num_classes, width=cfg.width, binarize=cfg.binarize,
                 shortcut=cfg.shortcut, dropout=cfg.dropout, block_style=cfg.block_style,
                 conv_kw=conv_options(cfg))


# --------------------------------------------------------------------------- ResNet-18
class BiRealBlock(nn.Module):
    """Two binary 3x3 convs, each with its own real-valued shortcut (Bi-Real Net)."""

    def __init__(self, cin, cout, stride, binarize, shortcut, conv_kw=None):
        super().__init__()
        self.conv1 = _binary_conv(binarize, cin, cout, stride, conv_kw)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.PReLU(cout)
        self.shortcut = _shortcut(shortcut, cin, cout, stride, with_bn=True)
        self.conv2 = _binary_conv(binarize, cout, cout, 1, conv_kw)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.PReLU(cout)

    def forward(self, x):
        o = self.act1(self.bn1(self.conv1(x)) + self.shortcut(x))
        return self.act2(self.bn2(self.conv2(o)) + o)


class HardtanhBlock(nn.Module):
    """Two binary 3x3 convs, one shortcut around the pair, hardtanh activations (IR-Net family)."""

    def __init__(self, cin, cout, stride, binarize, shortcut, conv_kw=None):
        super().__init__()
        self.conv1 = _binary_conv(binarize, cin, cout, stride, conv_kw)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _binary_conv(binarize, cout, cout, 1, conv_kw)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(shortcut, cin, cout, stride, with_bn=True)

    def forward(self, x):
        o = F.hardtanh(self.bn1(self.conv1(x)))
        return F.hardtanh(self.bn2(self.conv2(o)) + self.shortcut(x))


class ResNet18(_Classifier):
    def __init__(self, in_channels, num_classes, width=64, binarize="bonn",
                 block_style="bireal_per_conv", shortcut="fp_1x1", dropout=0.0, conv_kw=None):
        super().__init__()
        block = {"bireal_per_conv": BiRealBlock, "two_conv_hardtanh": HardtanhBlock}[block_style]
        self.stem = _fp_conv(in_channels, width, 3, 1, 1)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_act = nn.PReLU(width) if block_style == "bireal_per_conv" else nn.Hardtanh()
        blocks, cin = [], width
        for mult, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
            cout = width * mult
            for b in range(2):
                blocks.append(block(cin, cout, stride if b == 0 else 1, binarize, shortcut, conv_kw))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = cin
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        x = self.blocks(self.stem_act(self.stem_bn(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@register_model("resnet18")
def _resnet18(cfg, in_channels, num_classes, image_size):
    return ResNet18(in_channels, num_classes, width=cfg.width, binarize=cfg.binarize,
                    block_style=cfg.block_style, shortcut=cfg.shortcut, dropout=cfg.dropout,
                    conv_kw=conv_options(cfg))


# --------------------------------------------------------------------------- small CNN
class _Unit(nn.Module):
    """``act(BN(conv3x3(x)) [+ x])``: one binary conv with BN right after it."""

    def __init__(self, cin, cout, stride, binarize, residual=False, conv_kw=None):
        super().__init__()
        self.conv = _binary_conv(binarize, cin, cout, stride, conv_kw)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout)
        self.residual = residual and cin == cout and stride == 1

    def forward(self, x):
        o = self.bn(self.conv(x))
        return self.act(o + x if self.residual else o)


class SmallCNN(_Classifier):
    def __init__(self, in_channels, num_classes, image_size, width=16, binarize="bonn", dropout=0.0,
                 conv_kw=None):
        super().__init__()
        c = width
        big = image_size >= 16
        layers: list[nn.Module] = [_fp_conv(in_channels, c, 3, 1, 1), nn.BatchNorm2d(c), nn.PReLU(c)]
        if big:
            layers.append(nn.MaxPool2d(2))
        layers += [_Unit(c, 2 * c, 1, binarize, conv_kw=conv_kw), nn.MaxPool2d(2),
                   _Unit(2 * c, 2 * c, 1, binarize, residual=True, conv_kw=conv_kw)]
        out = 2 * c
        if big:
            layers.append(_Unit(2 * c, 4 * c, 2, binarize, conv_kw=conv_kw))
            out = 4 * c
        self.features = nn.Sequential(*layers)
        self.feature_dim = out
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(out, num_classes)

    def forward_features(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


@register_model("small_cnn")
def _small_cnn(cfg, in_channels, num_classes, image_size):
    return SmallCNN(in_channels, num_classes, image_size, width=cfg.width, binarize=cfg.binarize,
                    dropout=cfg.dropout, conv_kw=conv_options(cfg))
