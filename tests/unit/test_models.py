"""Models: every parameter learns (timm style), the FP/binary split of BONN §3.5, shapes, the registry."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.config import BLOCK_STYLES, MODELS as CONFIG_MODELS, TrainConfig
from trainables.layers import BonnConv2d, XnorConv2d
from trainables.losses import BayesianFeatureLoss, bayesian_kernel_loss
from trainables.models import MODELS, backbone_convs, build_model

torch.set_num_threads(1)

BINARY = (BonnConv2d, XnorConv2d)

# (model, extra config, in_channels, image_size, expected number of 3x3 backbone convs)
VARIANTS = [
    ("small_cnn", {}, 1, 8, 2),
    ("small_cnn", {}, 1, 28, 3),
    ("small_cnn", {}, 3, 32, 3),
    ("wrn22", {}, 3, 32, 18),
    ("wrn22", {"shortcut": "avgpool_pad", "dropout": 0.3}, 3, 32, 18),
    ("resnet18", {}, 3, 32, 16),
    ("resnet18", {"block_style": "two_conv_hardtanh"}, 3, 32, 16),
    ("resnet18", {"shortcut": "avgpool_pad"}, 3, 32, 16),
]
IDS = [f"{m}-{c}-{s}px" + ("-" + "-".join(f"{v}" for v in e.values()) if e else "") for m, e, c, s, _ in VARIANTS]


def _model(name, extra, binarize, in_ch, size, width=4):
    cfg = TrainConfig.from_dict({"model": name, "width": width, "binarize": binarize, **extra})
    torch.manual_seed(0)
    return build_model(cfg, in_ch, 10, size)


def test_registry_matches_config():
    assert set(MODELS) == set(CONFIG_MODELS) == set(BLOCK_STYLES)


@pytest.mark.parametrize("binarize", ["bonn", "xnor", "none"])
@pytest.mark.parametrize("name, extra, in_ch, size, n_binary", VARIANTS, ids=IDS)
def test_every_parameter_receives_a_gradient(name, extra, in_ch, size, n_binary, binarize):
    model = _model(name, extra, binarize, in_ch, size)
    model.train()
    x = torch.randn(6, in_ch, size, size)
    y = torch.arange(6) % 10
    feats, logits = model(x)
    loss = F.cross_entropy(logits, y)
    params = dict(model.named_parameters())
    if binarize == "bonn":
        floss = BayesianFeatureLoss(10, model.feature_dim, theta=1e-3, center_lr=0.5)
        loss = loss + bayesian_kernel_loss(model, 1e-4, 1e-4) + floss(feats, y)
        params.update({f"feature_loss.{k}": p for k, p in floss.named_parameters()})
    loss.backward()
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient: {missing}"
    bad = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient: {bad}"
    zero = [n for n, p in params.items() if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradient: {zero}"


@pytest.mark.parametrize("binarize", ["bonn", "xnor", "none"])
@pytest.mark.parametrize("name, extra, in_ch, size, n_binary", VARIANTS, ids=IDS)
def test_full_precision_and_binary_split(name, extra, in_ch, size, n_binary, binarize):
    model = _model(name, extra, binarize, in_ch, size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    backbone = backbone_convs(model)
    assert len(backbone) == n_binary
    # first conv (stem): full precision, not a backbone conv
    assert type(convs[0]) is nn.Conv2d and convs[0] not in backbone
    # every 1x1 conv (shortcuts) is full precision; every 3x3 conv but the stem is a backbone conv
    for m in convs:
        if m.kernel_size == (1, 1):
            assert type(m) is nn.Conv2d and m not in backbone
    assert [m for m in convs[1:] if m.kernel_size == (3, 3)] == backbone
    # the final layer is a full-precision Linear
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and type(linears[0]) is nn.Linear
    # backbone convs are exactly the binary layers of the chosen kind
    expected = {"bonn": BonnConv2d, "xnor": XnorConv2d, "none": nn.Conv2d}[binarize]
    assert all(type(m) is expected for m in backbone)
    binary = [m for m in model.modules() if isinstance(m, BINARY)]
    assert len(binary) == (0 if binarize == "none" else n_binary)
    # BN right after every binary conv's output (directly or after a residual add) is checked by count:
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= n_binary
    n_shortcut = sum(1 for m in convs if m.kernel_size == (1, 1))
    if extra.get("shortcut") == "avgpool_pad":
        assert n_shortcut == 0
    elif name == "wrn22":
        assert n_shortcut == 2  # 16->32 and 32->64 (the first group keeps the stem width)
    elif name == "resnet18":
        assert n_shortcut == 3


@pytest.mark.parametrize("name, extra, in_ch, size, n_binary", VARIANTS, ids=IDS)
def test_forward_returns_features_and_logits(name, extra, in_ch, size, n_binary):
    model = _model(name, extra, "bonn", in_ch, size).eval()
    with torch.no_grad():
        feats, logits = model(torch.randn(3, in_ch, size, size))
    assert feats.shape == (3, model.feature_dim)
    assert logits.shape == (3, 10)
    # features are the FC input
    assert torch.allclose(model.fc(feats), logits, atol=1e-5)
    assert model.model_meta == {"in_channels": in_ch, "num_classes": 10, "image_size": size}


@pytest.mark.parametrize("width, millions", [(16, 0.27), (64, 4.33)])
def test_wrn22_sizes_match_the_paper(width, millions):
    """BONN Table 3: WRN-22 16-16-32-64 has 0.27M parameters, 64-64-128-256 has 4.33M."""
    model = build_model({"model": "wrn22", "width": width, "binarize": "none"}, 3, 10, 32)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == millions
    assert model.feature_dim == 4 * width


def test_resnet18_widths():
    model = build_model({"model": "resnet18", "width": 64, "binarize": "bonn"}, 3, 10, 32)
    assert model.feature_dim == 512
    widths = [m.out_channels for m in backbone_convs(model)]
    assert widths == [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4


def test_build_model_accepts_a_dict_and_validates():
    from trainables.config import ConfigError

    with pytest.raises(ConfigError):
        build_model({"model": "resnet50"}, 3, 10, 32)
