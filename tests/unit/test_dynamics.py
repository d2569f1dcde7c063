"""Training-dynamics metrics (trainables.dynamics) and the recipe options of the learning issue:
optimizer, latent init scale, w init, STE clip bounds, latent group lr/wd, the WRN Bi-Real block."""
import numpy as np
import pytest
import torch

from trainables import fit
from trainables.binarize import ApproxSignSTE, BonnWeightBinarize, SignSTE, XnorWeightBinarize
from trainables.config import ConfigError, TrainConfig
from trainables.dynamics import Dynamics
from trainables.fast.fused import bonn_kernels_and_loss
from trainables.layers import bonn_layers
from trainables.models import backbone_convs, build_model
from trainables.optim import build_param_groups
from trainables.train import Trainer

QUIET = {"log": lambda s: None}
SMALL = {"dataset": "digits", "epochs": 2, "batch_size": 64, "lr": 0.1, "device": "cpu", "num_threads": 1,
         "hist_epochs": []}


def _wrn(**kw):
    cfg = TrainConfig.from_dict({"model": "wrn22", "width": 4, **kw})
    return cfg, build_model(cfg, 3, 10, 32)


# ----------------------------------------------------------------------------- dynamics
def test_flip_fractions_and_update_norms_count_what_changed():
    torch.manual_seed(0)
    _, model = _wrn()
    convs = backbone_convs(model)
    groups = {"latent": [c.weight for c in convs]}
    dyn = Dynamics(model, groups)
    dyn.start_epoch()
    n_total = sum(c.weight.numel() for c in convs)
    with torch.no_grad():
        w0 = convs[0].weight.view(-1)[:10].clone()
        convs[0].weight.view(-1)[:10] = -w0  # 10 flips in the first conv (no weight is exactly 0 after randn init)
        delta = torch.zeros_like(convs[1].weight)
        delta.view(-1)[0] = 3.0
        convs[1].weight.add_(delta)
    m = dyn.end_epoch()
    flipped_second = int(((convs[1].weight - delta >= 0) != (convs[1].weight >= 0)).sum())
    assert m["flip/conv01"] == pytest.approx(10 / convs[0].weight.numel())
    assert m["flip/conv02"] == pytest.approx(flipped_second / convs[1].weight.numel())
    assert m["flip_frac"] == pytest.approx((10 + flipped_second) / n_total)
    assert m["flip_frac_init"] == m["flip_frac"]
    # update norm: sqrt(sum of squared changes) = sqrt(sum (2 w)^2 over the flipped + 3^2)
    expected = torch.sqrt((2 * w0).pow(2).sum() + 9.0).item()
    assert m["update_norm/latent"] == pytest.approx(expected, rel=1e-5)
    assert m["latent_abs/conv01"] == pytest.approx(convs[0].weight.abs().mean().item(), rel=1e-6)
    assert m["wbar/conv01"] == pytest.approx(bonn_layers(model)[0].w.mean().item())
    # a second epoch without changes: no flips against the last epoch, the same against init
    dyn.start_epoch()
    m2 = dyn.end_epoch()
    assert m2["flip_frac"] == 0.0 and m2["flip_frac_init"] == m["flip_frac_init"]
    assert m2["update_norm/latent"] == 0.0


def test_init_signs_survive_the_checkpoint_state():
    torch.manual_seed(1)
    _, model = _wrn()
    convs = backbone_convs(model)
    dyn = Dynamics(model, {})
    state = dyn.state_dict()
    with torch.no_grad():
        convs[0].weight.neg_()
    restored = Dynamics(model, {}, state=state)
    restored.start_epoch()
    m = restored.end_epoch()
    assert m["flip_frac"] == 0.0
    assert m["flip_frac_init"] == pytest.approx(convs[0].weight.numel() / sum(c.weight.numel() for c in convs))


def test_fit_reports_flips_that_move_with_the_learning_rate():
    slow = fit({**SMALL, "lr": 1e-4}, **QUIET)
    fast = fit({**SMALL, "optimizer": "adam", "lr": 5e-3, "latent_init_scale": 0.1}, **QUIET)
    assert 0.0 <= slow["flip_frac"] < fast["flip_frac"] <= 1.0
    assert fast["flip_frac_init"] >= fast["flip_frac"]


# ----------------------------------------------------------------------------- options
def test_latent_init_scale_and_w_init():
    torch.manual_seed(0)
    _, ref = _wrn()
    torch.manual_seed(0)
    _, small = _wrn(latent_init_scale=0.1, w_init=0.2)
    for a, b in zip(bonn_layers(ref), bonn_layers(small)):
        torch.testing.assert_close(b.weight, 0.1 * a.weight)
        assert torch.all(b.w == 0.2)
        torch.testing.assert_close(b.mu, b.weight.abs().flatten(1).mean(1))  # prior follows the latent scale
        torch.testing.assert_close(a.w, torch.full_like(a.w, a.weight.abs().mean().item()))
    with pytest.raises(ConfigError, match="w_init: must be 'mean_abs' or a number > 0"):
        TrainConfig.from_dict({"w_init": -1})
    with pytest.raises(ConfigError, match="optimizer: must be one of"):
        TrainConfig.from_dict({"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="latent_weight_decay: must be >= 0"):
        TrainConfig.from_dict({"latent_weight_decay": -1e-4})


@pytest.mark.parametrize("clip", [0.5, 2.0])
def test_ste_clip_bounds_against_numpy(clip):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200) * 1.5
    a[:4] = [clip, -clip, 0.0, -0.0]
    g = rng.standard_normal(200)
    x = torch.tensor(a, requires_grad=True)
    SignSTE.apply(x, clip).backward(torch.from_numpy(g))
    np.testing.assert_array_equal(x.grad.numpy(), g * (np.abs(a) <= clip))
    x = torch.tensor(a, requires_grad=True)
    ApproxSignSTE.apply(x, clip).backward(torch.from_numpy(g))
    np.testing.assert_allclose(x.grad.numpy(), g * np.clip(2 / clip - 2 * np.abs(a) / clip ** 2, 0, None),
                               rtol=1e-12, atol=1e-15)
    # Eq. 12 / 15 with the mask 1{|w X| <= clip}
    X = rng.standard_normal((4, 3, 3, 3))
    w = rng.uniform(0.2, 2.0, size=(3, 3))
    G = rng.standard_normal(X.shape)
    Xt, wt = torch.tensor(X, requires_grad=True), torch.tensor(w, requires_grad=True)
    BonnWeightBinarize.apply(Xt, wt, clip).backward(torch.from_numpy(G))
    mask = np.abs(w * X) <= clip
    np.testing.assert_allclose(Xt.grad.numpy(), G * mask * w, rtol=1e-12)
    np.testing.assert_allclose(wt.grad.numpy(), (G * mask * X).sum((0, 1)), rtol=1e-12)
    W = torch.tensor(X, requires_grad=True)
    XnorWeightBinarize.apply(W, clip).backward(torch.from_numpy(G))
    alpha = np.abs(X).reshape(4, -1).mean(1)[:, None, None, None]
    np.testing.assert_allclose(W.grad.numpy(), G * alpha * (np.abs(X) <= clip), rtol=1e-12)


def test_fused_path_uses_the_ste_clip():
    torch.manual_seed(0)
    _, model = _wrn(ste_clip=0.05, w_init=1.0)  # a bound that masks part of the kernel
    layers = bonn_layers(model)
    kernels, _ = bonn_kernels_and_loss(layers, 0.0, 1e-4, ste_clip=0.05)
    g = [torch.randn_like(k) for k in kernels]
    fused = torch.autograd.grad(kernels, [m.weight for m in layers], g)
    ref = torch.autograd.grad([BonnWeightBinarize.apply(m.weight, m.w, 0.05) for m in layers],
                              [m.weight for m in layers], g)
    masked = sum(int((r == 0).sum()) for r in ref)
    assert masked > 0
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)


def test_latent_group_lr_and_weight_decay():
    cfg, model = _wrn(lr=0.1, latent_lr_ratio=0.5, latent_weight_decay=0.0, weight_decay=5e-4)
    groups = {g["name"]: g for g in build_param_groups(model, None, cfg, log=None)}
    assert groups["latent"]["lr"] == pytest.approx(0.05) and groups["latent"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 5e-4 and groups["decay"]["lr"] == 0.1
    cfg, model = _wrn(binarize="none")
    groups = {g["name"]: g for g in build_param_groups(model, None, cfg, log=None)}
    assert "latent" not in groups  # full-precision backbone convs are ordinary decayed weights


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_trains_and_centers_keep_the_center_loss_rule(optimizer):
    cfg, model = _wrn(optimizer=optimizer, lr=1e-3, theta=1e-2, center_lr=0.5)
    tr = Trainer(cfg, model, 10, torch.device("cpu"), steps_per_epoch=4, log=None)
    assert type(tr.optimizer).__name__ == {"adam": "Adam", "adamw": "AdamW"}[optimizer]
    tr.set_epoch(0)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    c0 = tr.feature_loss.centers.detach().clone()
    w0 = bonn_layers(model)[0].weight.detach().clone()
    tr.train_step(x, y)
    dc = tr.feature_loss.centers.grad
    torch.testing.assert_close(tr.feature_loss.centers.detach(), c0 - 0.5 * dc)  # plain SGD step, lr alpha
    moved = (bonn_layers(model)[0].weight - w0).abs().max().item()
    assert 0 < moved <= 1.1e-3  # Adam's first step moves each weight by at most lr
    sd = tr.state_dict()
    tr2 = Trainer(cfg, build_model(cfg, 3, 10, 32), 10, torch.device("cpu"), steps_per_epoch=4, log=None)
    tr2.load_state_dict(sd)
    assert tr2.optimizer.state_dict()["state"].keys() == tr.optimizer.state_dict()["state"].keys()


def test_wrn_bireal_block_has_a_shortcut_around_each_binary_conv():
    cfg, model = _wrn(block_style="bireal_per_conv")
    assert len(bonn_layers(model)) == 18
    f, logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and f.shape == (2, 16)
    blk = model.blocks[3]  # first block of group 2: stride 2, 4 -> 8 channels, FP 1x1 shortcut with BN
    assert isinstance(blk.shortcut, torch.nn.Sequential)
    with pytest.raises(ConfigError, match="block_style: must be one of"):
        TrainConfig.from_dict({"model": "wrn22", "block_style": "two_conv_hardtanh"})
