"""BonnConv2d / XnorConv2d / make_conv: shapes, [I] initialisation, forward and backward semantics."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.layers import BonnConv2d, XnorConv2d, bonn_layers, bonn_parameter_roles, make_conv
from trainables.losses import bayesian_kernel_loss


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def input_with_zeros(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    x[x.abs() < 0.3] = 0.0  # plenty of exact zeros (like after ReLU / padding)
    x.view(-1)[:4] = torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    assert (x == 0).sum() > 10
    return x


# ---------------------------------------------------------------- construction and init


@pytest.mark.parametrize("w_shape, expected", [("kxk", (3, 3)), ("cin_kxk", (8, 3, 3))])
def test_bonn_conv_parameters_and_init(w_shape, expected):
    torch.manual_seed(0)
    m = BonnConv2d(8, 64, 3, stride=2, padding=1, w_shape=w_shape)
    names = dict(m.named_parameters())
    assert set(names) == {"weight", "w", "mu", "sigma"}  # bias=False by default
    assert m.weight.shape == (64, 8, 3, 3) and m.w.shape == expected
    assert m.mu.shape == (64,) and m.sigma.shape == (64,)
    X = m.weight.detach().numpy()
    # Kaiming normal, fan-in, ReLU gain
    assert X.std() == pytest.approx(np.sqrt(2 / (8 * 9)), rel=0.08)
    # [I] w = mean|X| of the layer, positive and constant
    np.testing.assert_allclose(m.w.detach().numpy(), np.abs(X).mean(), rtol=1e-6)
    assert (m.w > 0).all()
    # mu_i = mean|X_i|, sigma_i = std|X_i| (population) per output filter
    a = np.abs(X).reshape(64, -1)
    np.testing.assert_allclose(m.mu.detach().numpy(), a.mean(1), rtol=1e-5)
    np.testing.assert_allclose(m.sigma.detach().numpy(), a.std(1), rtol=1e-4)


def test_bias_and_invalid_options():
    assert BonnConv2d(2, 3, 3, bias=True).bias.shape == (3,)
    with pytest.raises(ValueError, match="w_shape"):
        BonnConv2d(2, 3, 3, w_shape="cout")
    with pytest.raises(ValueError, match="act_ste"):
        BonnConv2d(2, 3, 3, act_ste="relu")
    with pytest.raises(ValueError, match="act_ste"):
        XnorConv2d(2, 3, 3, act_ste="relu")


def test_reset_prior_follows_changed_weights():
    m = BonnConv2d(4, 5, 3)
    with torch.no_grad():
        m.weight.mul_(4.0)
    m.reset_prior_()
    a = m.weight.detach().abs().flatten(1)
    torch.testing.assert_close(m.mu.detach(), a.mean(1))
    torch.testing.assert_close(m.sigma.detach(), a.std(1, correction=0))


# ---------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("w_shape", ["kxk", "cin_kxk"])
def test_bonn_forward_is_conv_of_signs_with_mean_w(w_shape):
    m = BonnConv2d(3, 4, 3, stride=1, padding=1, w_shape=w_shape).double()
    with torch.no_grad():
        m.w.uniform_(0.05, 0.5)
        m.weight.view(-1)[::5] = 0.0
    x = input_with_zeros((2, 3, 6, 6))
    kernel = m.w.detach().numpy().mean() * np_sign(m.weight.detach().numpy())
    ref = F.conv2d(torch.from_numpy(np_sign(x.numpy())), torch.from_numpy(kernel), padding=1)
    torch.testing.assert_close(m(x), ref, rtol=1e-13, atol=1e-13)


def test_binary_kernel_two_values_and_detached():
    m = BonnConv2d(6, 7, 3)
    with torch.no_grad():
        m.w.uniform_(0.1, 0.9)
        m.weight[0, 0] = 0.0
    kb = m.binary_kernel()
    assert not kb.requires_grad
    vals = torch.unique(kb)
    assert vals.numel() == 2
    torch.testing.assert_close(vals, torch.stack([-m.w.mean(), m.w.mean()]).detach())
    assert (kb[0, 0] == m.w.mean()).all()  # sign(0) = +1


def test_bonn_backward_input_clipped_ste_and_weight_eq12_eq15():
    m = BonnConv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        m.w.uniform_(0.5, 3.0)
        m.weight.mul_(8.0)  # some |w X| > 1 so the indicator matters
    x = input_with_zeros((2, 3, 5, 5), seed=1).requires_grad_()
    G = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    (m(x) * G).sum().backward()

    # reference: same conv on explicit constants, then apply the pseudo-gradients by hand
    xb = torch.from_numpy(np_sign(x.detach().numpy())).requires_grad_()
    X = m.weight.detach().numpy()
    w = m.w.detach().numpy()
    Kb = torch.from_numpy(w.mean() * np_sign(X)).requires_grad_()
    (F.conv2d(xb, Kb, padding=1) * G).sum().backward()
    a = x.detach().numpy()
    np.testing.assert_allclose(x.grad.numpy(), xb.grad.numpy() * (np.abs(a) <= 1), rtol=1e-12, atol=1e-13)
    gK = Kb.grad.numpy()
    mask = np.abs(w * X) <= 1
    assert 0.05 < mask.mean() < 0.95
    np.testing.assert_allclose(m.weight.grad.numpy(), gK * mask * w, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(m.w.grad.numpy(), (gK * mask * X).sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_input_gradient_is_zero_beyond_clip():
    m = BonnConv2d(1, 1, 1).double()
    x = torch.tensor([[[[0.0, 0.5, -1.0, 1.5, -3.0]]]], dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    g = x.grad.flatten()
    assert (g[:3] != 0).all() and (g[3:] == 0).all()


def test_approx_sign_option_changes_input_gradient():
    torch.manual_seed(0)
    a = BonnConv2d(2, 2, 1, act_ste="clipped").double()
    b = copy.deepcopy(a)
    b.act_ste = "approx_sign"
    x = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64).view(1, 2, 2, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa).sum().backward()
    b(xb).sum().backward()
    scale = (2 - 2 * x.abs()).numpy()
    np.testing.assert_allclose(xb.grad.numpy(), xa.grad.numpy() * scale, rtol=1e-13)


def test_xnor_conv_forward_and_gradients():
    m = XnorConv2d(3, 5, 3, stride=2, padding=1).double()
    with torch.no_grad():
        m.weight[1].mul_(20.0)  # a channel with |W| > 1 entries
    x = input_with_zeros((2, 3, 7, 7), seed=2)
    W = m.weight.detach().numpy()
    alpha = np.abs(W).reshape(5, -1).mean(1)[:, None, None, None]
    Kb = torch.from_numpy(alpha * np_sign(W)).requires_grad_()
    ref = F.conv2d(torch.from_numpy(np_sign(x.numpy())), Kb, stride=2, padding=1)
    out = m(x)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-13, atol=1e-13)
    G = torch.randn_like(out)
    (out * G).sum().backward()
    (ref * G).sum().backward()
    expected = Kb.grad.numpy() * alpha * (np.abs(W) <= 1)
    np.testing.assert_allclose(m.weight.grad.numpy(), expected, rtol=1e-12, atol=1e-13)
    assert (m.weight.grad[1] == 0).any()
    kb = m.binary_kernel()
    for o in range(5):
        assert torch.unique(kb[o]).numel() == 2


# ---------------------------------------------------------------- factory and helpers


def test_make_conv_factory():
    b = make_conv("bonn", 4, 8, 3, 2, 1, w_shape="cin_kxk", act_ste="approx_sign")
    assert type(b) is BonnConv2d and b.stride == (2, 2) and b.padding == (1, 1)
    assert b.w.shape == (4, 3, 3) and b.act_ste == "approx_sign" and b.bias is None
    x = make_conv("xnor", 4, 8, 3, 1, 1, bias=True)
    assert type(x) is XnorConv2d and x.bias is not None
    n = make_conv("none", 4, 8, 3, 1, 1, w_shape="kxk")
    assert type(n) is nn.Conv2d and n.bias is None and n.kernel_size == (3, 3)
    for conv in (b, x, n):
        assert isinstance(conv, nn.Conv2d)
        assert conv(torch.randn(1, 4, 8, 8)).shape[1] == 8
    with pytest.raises(ValueError, match="binarize"):
        make_conv("ternary", 4, 8, 3)
    with pytest.raises(TypeError, match="unexpected"):
        make_conv("bonn", 4, 8, 3, dilation=2)


def test_full_precision_conv_is_not_binary():
    n = make_conv("none", 2, 3, 3, 1, 1).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(n(x), F.conv2d(x, n.weight, padding=1))


def test_bonn_layers_and_parameter_roles():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Sequential(make_conv("bonn", 8, 8, 3, 1, 1), nn.BatchNorm2d(8)),
        make_conv("xnor", 8, 8, 3),
        make_conv("bonn", 8, 4, 3, w_shape="cin_kxk"),
    )
    layers = bonn_layers(model)
    assert layers == [model[1][0], model[3]]
    roles = bonn_parameter_roles(model)
    assert [p.shape for p in roles["modulation"]] == [(3, 3), (8, 3, 3)]
    assert roles["latent"][1] is model[3].weight and roles["sigma"][0] is model[1][0].sigma
    assert bonn_layers(model[3]) == [model[3]]


def test_every_bonn_parameter_gets_a_gradient_and_state_dict_round_trips():
    torch.manual_seed(0)
    def build():
        return nn.Sequential(make_conv("bonn", 3, 6, 3, 1, 1), nn.BatchNorm2d(6),
                             make_conv("bonn", 6, 6, 3, 1, 1, w_shape="cin_kxk"))

    model = build()
    out = model(torch.randn(2, 3, 6, 6))
    loss = out.square().mean() + bayesian_kernel_loss(model, 1e-2, 1e-2)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    clone = build()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), model(x))
