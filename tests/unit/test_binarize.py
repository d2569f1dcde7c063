"""Binarizers against independent NumPy references (forward formula and pseudo-gradient).

Every input contains exact zeros (and -0.0), the clip boundaries |x| = 1 and values beyond them.
"""
import numpy as np
import pytest
import torch

from trainables.binarize import (
    ApproxSignSTE,
    BonnWeightBinarize,
    SignSTE,
    XnorWeightBinarize,
    binarize_activation,
    bonn_binarize,
    sign,
    xnor_binarize,
)

# ---------------------------------------------------------------- NumPy references


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_ste_grad(x, g):
    return g * (np.abs(x) <= 1)


def np_approx_sign_grad(x, g):
    return g * np.where(np.abs(x) <= 1, 2.0 - 2.0 * np.abs(x), 0.0)


def np_bonn_backward(X, w, G):
    """Eq. 12 and Eq. 15 of the BONN paper, written out with explicit loops over kernels."""
    mask = (np.abs(w * X) <= 1).astype(X.dtype)
    gX = G * mask * w
    gw = np.zeros_like(w)
    lead = X.shape[: X.ndim - w.ndim]
    for idx in np.ndindex(*lead):
        gw += G[idx] * mask[idx] * X[idx]
    return gX, gw


def with_special_values(a, rng):
    """Overwrite a few random positions with 0, -0.0, +-1 (clip boundary) and +-1.5."""
    flat = a.reshape(-1)
    specials = np.array([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 0.0, 0.0])
    pos = rng.choice(flat.size, size=min(flat.size, specials.size), replace=False)
    flat[pos] = specials[: pos.size]
    return a


# ---------------------------------------------------------------- sign


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sign_is_never_zero_and_keeps_dtype(dtype):
    x = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 2.5, -3.0, 1.0, -1.0], dtype=dtype)
    y = sign(x)
    assert y.dtype == dtype
    assert y.shape == x.shape
    assert torch.equal(y.float(), torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]))
    assert (y != 0).all()


def test_sign_matches_numpy_on_random_tensor_with_zeros():
    rng = np.random.default_rng(0)
    a = with_special_values(rng.standard_normal((4, 5, 6)), rng)
    a[a < -1.2] = 0.0
    assert (a == 0).sum() >= 3
    np.testing.assert_array_equal(sign(torch.from_numpy(a)).numpy(), np_sign(a))


# ---------------------------------------------------------------- activation STEs


@pytest.mark.parametrize(
    "fn, np_grad",
    [(SignSTE.apply, np_ste_grad), (ApproxSignSTE.apply, np_approx_sign_grad),
     (lambda t: binarize_activation(t, "clipped"), np_ste_grad),
     (lambda t: binarize_activation(t, "approx_sign"), np_approx_sign_grad)],
    ids=["SignSTE", "ApproxSignSTE", "clipped", "approx_sign"],
)
def test_activation_ste_forward_and_gradient(fn, np_grad):
    rng = np.random.default_rng(1)
    a = with_special_values(rng.uniform(-2, 2, size=(3, 4, 5)), rng)
    g = rng.standard_normal(a.shape)
    x = torch.tensor(a, requires_grad=True)
    y = fn(x)
    np.testing.assert_array_equal(y.detach().numpy(), np_sign(a))
    y.backward(torch.from_numpy(g))
    np.testing.assert_allclose(x.grad.numpy(), np_grad(a, g), rtol=0, atol=1e-15)


def test_clipped_ste_zeroes_gradient_outside_and_passes_inside():
    x = torch.tensor([-3.0, -1.0001, -1.0, -0.5, 0.0, -0.0, 0.5, 1.0, 1.0001, 3.0], requires_grad=True)
    SignSTE.apply(x).backward(torch.full_like(x, 7.0))
    assert x.grad.tolist() == [0.0, 0.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 0.0, 0.0]


def test_approx_sign_peaks_at_zero():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ApproxSignSTE.apply(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 1.5, 0.0, 0.0]


def test_unknown_activation_ste_is_rejected():
    with pytest.raises(ValueError, match="act_ste"):
        binarize_activation(torch.zeros(3), "tanh")


# ---------------------------------------------------------------- BONN weight binarizer (Eq. 12 / 15)


@pytest.mark.parametrize("w_shape", ["kxk", "cin_kxk"])
@pytest.mark.parametrize("scale", [0.3, 2.0], ids=["mask_mostly_on", "mask_partly_off"])
def test_bonn_binarize_forward_and_eq12_eq15_gradients(w_shape, scale):
    rng = np.random.default_rng(2)
    co, ci, k = 5, 4, 3
    X = with_special_values(rng.standard_normal((co, ci, k, k)) * scale, rng)
    X[0, 0] = 0.0  # a whole 2-D kernel of exact zeros
    w = rng.uniform(0.1, 1.5, size=(k, k) if w_shape == "kxk" else (ci, k, k))
    # elements exactly on the boundary |w X| = 1 (kept: the indicator is 1{-1 <= w X <= 1})
    w[..., 0, 0] = 0.5
    X[1:, :, 0, 0] = 2.0
    X[1, 1, 0, 0] = -2.0
    G = rng.standard_normal(X.shape)
    assert (np.abs(w * X) == 1).sum() >= co - 1
    mask_on = (np.abs(w * X) <= 1).mean()
    assert 0.0 < mask_on <= 1.0
    if scale == 2.0:
        assert mask_on < 0.9, "the test should exercise the indicator 1{|w X| <= 1}"

    Xt = torch.tensor(X, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    Xhat = BonnWeightBinarize.apply(Xt, wt)
    np.testing.assert_allclose(Xhat.detach().numpy(), w.mean() * np_sign(X), rtol=1e-15, atol=0)
    Xhat.backward(torch.from_numpy(G))
    gX, gw = np_bonn_backward(X, w, G)
    np.testing.assert_allclose(Xt.grad.numpy(), gX, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(wt.grad.numpy(), gw, rtol=1e-12, atol=1e-12)
    assert wt.grad.shape == wt.shape


def test_bonn_effective_kernel_has_exactly_two_values():
    torch.manual_seed(0)
    X = torch.randn(8, 3, 3, 3)
    X[0, 0, 0, 0] = 0.0
    X[1, 1, 1, 1] = -0.0
    w = torch.rand(3, 3) + 0.05
    Xhat = bonn_binarize(X, w)
    vals = torch.unique(Xhat)
    assert vals.numel() == 2
    torch.testing.assert_close(vals, torch.stack([-w.mean(), w.mean()]))
    assert Xhat[0, 0, 0, 0] == w.mean() and Xhat[1, 1, 1, 1] == w.mean()


def test_bonn_w_gradient_has_no_term_through_mean():
    """Plain autograd of mean(w)*sign(X) would give every w_j the same sum(G*sign(X))/numel(w);
    Eq. 15 instead gives a per-position sum of G * X. With G = sign(X) the two differ clearly."""
    X = torch.tensor([[[[0.5, -0.2], [0.0, 0.1]]]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    BonnWeightBinarize.apply(X, w).backward(sign(X.detach()))
    # Eq. 15: G * 1{|wX|<=1} * X = sign(X) * X = |X| (0 at X = 0), per position
    assert w.grad.tolist() == [[0.5, 0.2], [0.0, 0.1]]


# ---------------------------------------------------------------- XNOR weight binarizer


def test_xnor_binarize_per_channel_scale_and_clipped_ste():
    rng = np.random.default_rng(3)
    W = with_special_values(rng.standard_normal((6, 3, 3, 3)) * 0.8, rng)
    W[2] *= 5.0  # one channel with a much larger scale and weights beyond the clip
    G = rng.standard_normal(W.shape)
    alpha = np.abs(W).reshape(6, -1).mean(1)[:, None, None, None]

    Wt = torch.tensor(W, requires_grad=True)
    Wb = xnor_binarize(Wt)
    np.testing.assert_allclose(Wb.detach().numpy(), alpha * np_sign(W), rtol=1e-15)
    for o in range(6):  # exactly two values per output channel: +-alpha_o
        vals = np.unique(Wb[o].detach().numpy())
        assert vals.size == 2 and vals[0] == -vals[1]
        np.testing.assert_allclose(vals[1], alpha[o, 0, 0, 0], rtol=1e-15)
    Wb.backward(torch.from_numpy(G))
    np.testing.assert_allclose(Wt.grad.numpy(), G * alpha * (np.abs(W) <= 1), rtol=1e-14, atol=0)
    assert (Wt.grad[2].abs() == 0).any(), "clipped STE should zero gradients of |W| > 1"


def test_xnor_scale_is_detached():
    """With G = 1 everywhere and all |W| <= 1, the gradient is exactly alpha (no d alpha / d W term)."""
    W = torch.tensor([[[[0.2, -0.4]]], [[[0.0, 0.6]]]], dtype=torch.float64, requires_grad=True)
    XnorWeightBinarize.apply(W).sum().backward()
    np.testing.assert_allclose(W.grad.flatten().numpy(), [0.3, 0.3, 0.3, 0.3], rtol=1e-15)
