"""Bayesian kernel loss (BONN Eqs. 13, 16-18) and feature loss (Eq. 8) against NumPy references.

The references below are written from the paper's printed formulas, case by case (X >= 0 / X < 0),
not from the compact |X| form the implementation uses. Inputs contain exact zeros.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from trainables.layers import BonnConv2d
from trainables.losses import (
    BayesianFeatureLoss,
    bayesian_kernel_loss,
    clamp_prior_,
    closed_form_mu_sigma_,
    kernel_loss_value,
)
from trainables.fast.fused import kernel_loss_all_layers
from trainables.flat_layout import layer_plan as _plan

LAM, NU = 0.03, 0.2  # large enough that every term matters at float64 precision


def kernel_loss(layers, lam, nu, fused: bool):
    """The kernel loss of the fused all-layers path (trainables.fast) or of the per-layer reference."""
    return (kernel_loss_all_layers if fused else bayesian_kernel_loss)(layers, lam, nu)

# ---------------------------------------------------------------- NumPy references (paper formulas)


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_kernel_grads(X, w, mu, sigma, lam, nu):
    """Eq. 13 (X), Eq. 16 (w), Eq. 17 (mu), Eq. 18 (sigma) for one layer, element by element."""
    co = X.shape[0]
    K = X[0].size
    Xhat = w.mean() * np_sign(X)
    gX = np.empty_like(X)
    for i in range(co):
        for idx in np.ndindex(*X.shape[1:]):
            x = X[(i, *idx)]
            wj = w[idx[len(idx) - w.ndim :]]
            gmm = (x - mu[i]) if x >= 0 else (x + mu[i])
            gX[(i, *idx)] = lam * (wj * (wj * x - Xhat[(i, *idx)]) + nu * sigma[i] ** -2 * gmm)
    lead = tuple(range(X.ndim - w.ndim))
    gw = lam * ((w * X - Xhat) * X).sum(axis=lead)
    gmu = np.zeros(co)
    gsig = np.zeros(co)
    for i in range(co):
        for x in X[i].reshape(-1):
            if x >= 0:
                gmu[i] += sigma[i] ** -2 * (mu[i] - x)
                gsig[i] += -sigma[i] ** -3 * (x - mu[i]) ** 2 + 1 / sigma[i]
            else:
                gmu[i] += sigma[i] ** -2 * (mu[i] + x)
                gsig[i] += -sigma[i] ** -3 * (x + mu[i]) ** 2 + 1 / sigma[i]
    return gX, gw, lam * nu / K * gmu, lam * nu / K * gsig


def np_objective(X, w, mu, sigma, lam, nu):
    """docs/bonn-method.md section 2.4 optimisation objective for one layer."""
    K = X[0].size
    Xhat = w.mean() * np_sign(X)
    recon = ((Xhat - w * X) ** 2).sum()
    dev2 = ((np.abs(X) - mu[:, None, None, None]) ** 2).reshape(X.shape[0], -1).sum(1)
    gmm_x = (dev2 / sigma**2).sum()
    gmm_ms = (dev2 / K / sigma**2 + np.log(sigma**2)).sum()
    return 0.5 * lam * (recon + nu * (gmm_x + gmm_ms))


def np_eq9(X, w, mu, sigma, lam, nu):
    """Kernel part of Eq. 9 with Psi_i = sigma_i^2 I and a per-kernel log-det."""
    total = 0.0
    Xhat = w.mean() * np_sign(X)
    for i in range(X.shape[0]):
        xp = X[i][X[i] >= 0]
        xm = X[i][X[i] < 0]
        total += ((Xhat[i] - w * X[i]) ** 2).sum()
        total += nu * (((xp - mu[i]) ** 2).sum() + ((xm + mu[i]) ** 2).sum()) / sigma[i] ** 2
        total += nu * np.log(np.linalg.det(sigma[i] ** 2 * np.eye(X[i].size)))
    return 0.5 * lam * total


# ---------------------------------------------------------------- fixtures


def make_layers(seed=0, dtype=torch.float64):
    """Seven layers: w of shape (k,k) and (C_in,k,k), runs of identically shaped layers, a 1x1 conv;
    random prior, exact zeros in X (and one all-zero filter per layer)."""
    torch.manual_seed(seed)
    specs = [(3, 5, 3, "kxk"), (5, 5, 3, "kxk"), (5, 5, 3, "kxk"), (5, 4, 3, "cin_kxk"),
             (4, 4, 3, "cin_kxk"), (4, 4, 3, "cin_kxk"), (4, 6, 1, "kxk")]
    layers = []
    for cin, cout, k, ws in specs:
        m = BonnConv2d(cin, cout, k, w_shape=ws).to(dtype)
        with torch.no_grad():
            m.weight.mul_(3.0)
            flat = m.weight.view(-1)
            flat[torch.randperm(flat.numel())[: max(3, flat.numel() // 8)]] = 0.0
            m.weight[0] = 0.0  # a filter with all zeros
            m.w.copy_(torch.rand_like(m.w) + 0.2)
            m.mu.copy_(torch.rand_like(m.mu) * 0.5 + 0.05)
            m.sigma.copy_(torch.rand_like(m.sigma) * 0.5 + 0.1)
        layers.append(m)
    assert sum(int((m.weight == 0).sum()) for m in layers) > 10
    return layers


def np_params(m):
    return [t.detach().numpy().copy() for t in (m.weight, m.w, m.mu, m.sigma)]


def zero_grads(layers):
    for m in layers:
        for p in m.parameters():
            p.grad = None


# ---------------------------------------------------------------- kernel loss


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layerwise"])
def test_kernel_loss_gradients_are_eqs_13_16_17_18(fused):
    layers = make_layers()
    loss = kernel_loss(layers, LAM, NU, fused=fused)
    loss.backward()
    for m in layers:
        X, w, mu, sigma = np_params(m)
        gX, gw, gmu, gsig = np_kernel_grads(X, w, mu, sigma, LAM, NU)
        np.testing.assert_allclose(m.weight.grad.numpy(), gX, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(m.w.grad.numpy(), gw, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(m.mu.grad.numpy(), gmu, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(m.sigma.grad.numpy(), gsig, rtol=1e-10, atol=1e-13)
        assert m.w.grad.shape == m.w.shape


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layerwise"])
def test_kernel_loss_value_is_section_2_4_objective(fused):
    layers = make_layers(1)
    expected = sum(np_objective(*np_params(m), LAM, NU) for m in layers)
    got = kernel_loss(layers, LAM, NU, fused=fused)
    assert got.dim() == 0
    np.testing.assert_allclose(got.item(), expected, rtol=1e-12)


def test_gradient_at_exact_zero_uses_plus_mode():
    """X = 0 belongs to the '+' set: its Bayesian gradient is nu sigma^-2 (0 - mu) (abs() would give 0)."""
    m = BonnConv2d(1, 1, 1).double()
    with torch.no_grad():
        m.weight.zero_()
        m.w.fill_(0.5)
        m.mu.fill_(0.2)
        m.sigma.fill_(0.1)
    for fused in (True, False):
        zero_grads([m])
        kernel_loss(m, 1.0, 1.0, fused=fused).backward()
        # lam { w (w*0 - wbar*sign(0)) + nu sigma^-2 (0 - mu) } = 0.5*(-0.5) + 100*(-0.2)
        assert m.weight.grad.item() == pytest.approx(-0.25 - 20.0, rel=1e-14)


def test_fused_and_layerwise_agree_in_float32():
    a = make_layers(2, torch.float32)
    b = copy.deepcopy(a)
    va = kernel_loss(a, LAM, NU, fused=True)
    vb = kernel_loss(b, LAM, NU, fused=False)
    va.backward()
    vb.backward()
    torch.testing.assert_close(va, vb, rtol=1e-5, atol=0)
    for ma, mb in zip(a, b):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-7)


def test_upstream_gradient_scales_all_four_gradients():
    a = make_layers(3)
    b = copy.deepcopy(a)
    kernel_loss(a, LAM, NU, fused=True).backward()
    (2.5 * kernel_loss(b, LAM, NU, fused=True)).backward()
    for ma, mb in zip(a, b):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(pb.grad, 2.5 * pa.grad, rtol=1e-13, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layerwise"])
def test_frozen_prior_gets_no_gradient_and_others_unchanged(fused):
    a = make_layers(4)
    b = copy.deepcopy(a)
    for m in b:
        m.mu.requires_grad_(False)
        m.sigma.requires_grad_(False)
    kernel_loss(a, LAM, NU, fused=fused).backward()
    kernel_loss(b, LAM, NU, fused=fused).backward()
    for ma, mb in zip(a, b):
        assert mb.mu.grad is None and mb.sigma.grad is None
        torch.testing.assert_close(mb.weight.grad, ma.weight.grad, rtol=1e-14, atol=0)
        torch.testing.assert_close(mb.w.grad, ma.w.grad, rtol=1e-14, atol=0)


def test_accepts_single_layer_list_or_model_and_handles_empty_and_zero_lambda():
    layers = make_layers(5)
    model = nn.Sequential(*layers, nn.Conv2d(6, 2, 1))
    v_list = bayesian_kernel_loss(layers, LAM, NU)
    v_model = bayesian_kernel_loss(model, LAM, NU)
    v_single = sum(bayesian_kernel_loss(m, LAM, NU) for m in layers)
    torch.testing.assert_close(v_model, v_list)
    torch.testing.assert_close(v_single, v_list)
    assert bayesian_kernel_loss([], LAM, NU).item() == 0.0
    z = bayesian_kernel_loss(layers, 0.0, NU)
    assert z.item() == 0.0 and not z.requires_grad


def test_fused_loss_is_deterministic_and_plans_are_per_shape():
    a = make_layers(6)
    assert [r.layers for r in _plan(a).runs] == [1, 2, 1, 2, 1]  # identical neighbours share a run
    v1 = kernel_loss(a, LAM, NU, fused=True)
    v2 = kernel_loss(a, LAM, NU, fused=True)
    assert torch.equal(v1, v2)
    # a different set of shapes on the same process still matches the reference
    m = BonnConv2d(2, 3, 3, w_shape="cin_kxk").double()
    kernel_loss([m], LAM, NU, fused=True).backward()
    gX, gw, gmu, gsig = np_kernel_grads(*np_params(m), LAM, NU)
    np.testing.assert_allclose(m.w.grad.numpy(), gw, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(m.sigma.grad.numpy(), gsig, rtol=1e-9, atol=1e-14)


def test_kernel_loss_value_matches_eq9():
    layers = make_layers(7)
    expected = sum(np_eq9(*np_params(m), LAM, NU) for m in layers)
    got = kernel_loss_value(layers, LAM, NU)
    assert not got.requires_grad
    np.testing.assert_allclose(got.item(), expected, rtol=1e-10)
    # and it really differs from the optimisation objective (1/K normalisation of the prior terms)
    assert abs(got.item() - bayesian_kernel_loss(layers, LAM, NU).item()) > 1e-6


# ---------------------------------------------------------------- closed form / clamping


def test_closed_form_mu_sigma_are_moments_of_abs_x_and_stationary():
    layers = make_layers(8)
    closed_form_mu_sigma_(layers)
    for m in layers:
        a = np.abs(m.weight.detach().numpy()).reshape(m.out_channels, -1)
        mu = a.mean(1)
        sig = np.maximum(np.sqrt(((a - mu[:, None]) ** 2).mean(1)), 1e-8)
        np.testing.assert_allclose(m.mu.detach().numpy(), mu, rtol=1e-12)
        np.testing.assert_allclose(m.sigma.detach().numpy(), sig, rtol=1e-12)
        assert m.sigma[0].item() == 1e-8  # all-zero filter: sigma clamped
    # Eqs. 17-18 vanish at the closed form (filters with nonzero spread)
    keep = [m for m in layers]
    zero_grads(keep)
    bayesian_kernel_loss(keep, LAM, NU).backward()
    for m in keep:
        np.testing.assert_allclose(m.mu.grad[1:].numpy(), 0.0, atol=1e-12)
        scale = LAM * NU / m.sigma[1:].detach().numpy()
        np.testing.assert_allclose(m.sigma.grad[1:].numpy() / scale, 0.0, atol=1e-9)


def test_clamp_prior_keeps_mu_sigma_positive_in_place():
    layers = make_layers(9)
    with torch.no_grad():
        layers[0].mu[1] = -0.5
        layers[1].sigma[2] = 0.0
        layers[2].sigma[0] = -1.0
    ids = [m.mu.data_ptr() for m in layers]
    clamp_prior_(layers, eps=1e-6)
    assert [m.mu.data_ptr() for m in layers] == ids
    assert layers[0].mu[1].item() == 1e-6 and layers[1].sigma[2].item() == 1e-6
    assert layers[2].sigma[0].item() == 1e-6
    assert all((m.mu >= 1e-6).all() and (m.sigma >= 1e-6).all() for m in layers)
    assert layers[0].mu[0].item() > 1e-6  # untouched values stay


def test_sigma_min_floors_sigma_only_in_clamp_and_closed_form():
    layers = make_layers(10)
    with torch.no_grad():
        layers[0].mu[0] = 1e-5
        layers[0].sigma[0] = 1e-6
        layers[1].sigma[1] = 3e-4
    clamp_prior_(layers, eps=1e-8, sigma_min=1e-4)
    assert layers[0].mu[0].item() == pytest.approx(1e-5)  # mu keeps its own floor
    assert layers[0].sigma[0].item() == pytest.approx(1e-4) and layers[1].sigma[1].item() == pytest.approx(3e-4)
    closed_form_mu_sigma_(layers, sigma_min=1e-4)
    for m in layers:
        a = np.abs(m.weight.detach().numpy()).reshape(m.out_channels, -1)
        sig = np.maximum(np.sqrt(((a - a.mean(1)[:, None]) ** 2).mean(1)), 1e-4)
        np.testing.assert_allclose(m.sigma.detach().numpy(), sig, rtol=1e-12)
    assert layers[0].sigma[0].item() == 1e-4  # the all-zero filter sits on the floor, not at 1e-8


def test_trainer_keeps_sigma_at_or_above_sigma_min():
    from trainables.config import TrainConfig
    from trainables.models import build_model
    from trainables.train import Trainer

    cfg = TrainConfig.from_dict({"model": "small_cnn", "width": 4, "binarize": "bonn", "device": "cpu",
                                 "latent_init_scale": 0.01, "sigma_min": 5e-3, "lam": 1e-4})
    torch.manual_seed(0)
    model = build_model(cfg, 1, 10, 8)
    tr = Trainer(cfg, model, 10, torch.device("cpu"), steps_per_epoch=2, log=None)
    assert min(float(m.sigma.detach().min()) for m in tr.layers) < 5e-3  # small latent weights start below the floor
    tr.set_epoch(0)
    tr.train_step(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert min(float(m.sigma.detach().min()) for m in tr.layers) >= np.float32(5e-3)  # the floor in the weights' dtype


# ---------------------------------------------------------------- feature loss (Eq. 8)


def feature_case(seed=0, B=12, M=4, D=5):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((B, D))
    f[0, :2] = 0.0
    y = np.array([0, 1, 1, 3, 0, 1, 3, 3, 3, 0, 1, 1][:B])  # class 2 absent from the batch
    c = rng.standard_normal((M, D)) * 0.5
    lv = rng.standard_normal((M, D)) * 0.3
    return f, y, c, lv


def make_feature_loss(c, lv, theta):
    fl = BayesianFeatureLoss(c.shape[0], c.shape[1], theta=theta).double()
    with torch.no_grad():
        fl.centers.copy_(torch.from_numpy(c))
        fl.log_var.copy_(torch.from_numpy(lv))
    return fl


def test_feature_loss_value_and_gradients():
    theta = 0.7
    f, y, c, lv = feature_case()
    B = f.shape[0]
    fl = make_feature_loss(c, lv, theta)
    ft = torch.tensor(f, requires_grad=True)
    out = fl(ft, torch.from_numpy(y))
    # Eq. 8, batch mean
    d = f - c[y]
    s2 = np.exp(lv[y])
    expected = theta / 2 * np.mean((d**2).sum(1) + (d**2 / s2 + np.log(s2)).sum(1))
    np.testing.assert_allclose(out.item(), expected, rtol=1e-13)
    out.backward()
    # features: true gradient
    np.testing.assert_allclose(ft.grad.numpy(), theta / B * d * (1 + 1 / s2), rtol=1e-12)
    # log_var: theta/2 * d/dv [ d^2 e^-v + v ] / B, summed over samples of each class
    g_lv = np.zeros_like(lv)
    for i in range(B):
        g_lv[y[i]] += theta / 2 / B * (1 - d[i] ** 2 / s2[i])
    np.testing.assert_allclose(fl.log_var.grad.numpy(), g_lv, rtol=1e-12, atol=1e-15)
    # centers: center-loss rule sum_{i:y_i=j}(c_j - f_i) / (1 + n_j), independent of theta
    g_c = np.zeros_like(c)
    for j in range(c.shape[0]):
        idx = y == j
        g_c[j] = (c[j] - f[idx]).sum(0) / (1 + idx.sum())
    np.testing.assert_allclose(fl.centers.grad.numpy(), g_c, rtol=1e-12, atol=1e-15)
    assert (fl.centers.grad[2] == 0).all()


def test_center_gradient_independent_of_theta_and_sgd_step_is_center_loss_update():
    f, y, c, lv = feature_case(1)
    grads = []
    for theta in (1e-3, 10.0):
        fl = make_feature_loss(c, lv, theta)
        fl(torch.from_numpy(f), torch.from_numpy(y)).backward()
        grads.append(fl.centers.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    alpha = 0.5
    fl = make_feature_loss(c, lv, 1.0)
    fl.center_lr = alpha
    opt = torch.optim.SGD(fl.param_groups(lr=0.1), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fl(torch.from_numpy(f), torch.from_numpy(y)).backward()
    opt.step()
    for j in range(c.shape[0]):
        idx = y == j
        expect = c[j] - alpha * (c[j] - f[idx]).sum(0) / (1 + idx.sum())
        np.testing.assert_allclose(fl.centers[j].detach().numpy(), expect, rtol=1e-13)


def test_theta_is_settable_at_runtime_and_saved_in_state_dict():
    f, y, c, lv = feature_case(2)
    fl = make_feature_loss(c, lv, 0.0)
    ft, yt = torch.from_numpy(f), torch.from_numpy(y)
    assert fl(ft, yt).item() == 0.0
    fl.theta = 0.3
    v1 = fl(ft, yt).item()
    fl.theta = 0.6
    v2 = fl(ft, yt).item()
    assert v1 > 0 and v2 == pytest.approx(2 * v1, rel=1e-14)
    fl.center_lr = 0.25
    other = BayesianFeatureLoss(c.shape[0], c.shape[1], theta=0.0).double()
    other.load_state_dict(fl.state_dict())
    assert other.theta == 0.6 and other.center_lr == 0.25
    torch.testing.assert_close(other.centers, fl.centers)


def test_feature_loss_under_low_precision_features_is_float32():
    fl = BayesianFeatureLoss(3, 4, theta=1.0)
    f = torch.randn(6, 4).to(torch.bfloat16).requires_grad_()
    out = fl(f, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.dtype == torch.float32
    out.backward()
    assert f.grad.dtype == torch.bfloat16 and fl.centers.grad.shape == (3, 4)
