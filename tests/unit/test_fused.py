"""The fused all-layers BONN path (trainables.fast.fused) against the per-layer reference.

One training step of a whole model, fused vs reference: the gradient of every parameter the optimiser
holds (latent kernels, w, mu, sigma, BN, FC, feature-loss centres and log-variances), in float32 and
under bf16 autocast, contiguous and channels_last, both shapes of w. Plus the kernel outputs and
gradients of the fused binarizer against BonnWeightBinarize in float64.
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

import trainables.layers as layers_mod

from trainables.binarize import BonnWeightBinarize
from trainables.config import TrainConfig
from trainables.fast.fused import bonn_kernels_and_loss
from trainables.flat_layout import layer_plan
from trainables.layers import BonnConv2d, bonn_layers
from trainables.losses import bayesian_kernel_loss
from trainables.models import build_model
from trainables.train import Trainer


def _step_grads(cfg_over: dict, fused: bool, channels_last: bool, amp: bool, seed: int = 0):
    cfg = TrainConfig.from_dict({"model": "wrn22", "width": 16, "lam": 1e-2, "nu": 1e-1, "theta": 1e-2,
                                 "feature_loss_start_epoch": 0, "device": "cpu", "epochs": 2,
                                 "batch_size": 8, "fused_bonn": fused, "cuda_graph": False,
                                 "channels_last": channels_last, "amp": amp, **cfg_over})
    torch.manual_seed(seed)
    model = build_model(cfg, 3, 10, 16)
    gp = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move the prior off its init (the exact minimiser, where d/dmu ~ 0)
        for m in bonn_layers(model):
            for t in (m.mu, m.sigma, m.w):
                t.mul_(torch.empty(t.shape).uniform_(0.5, 1.5, generator=gp))
    tr = Trainer(cfg, model, 10, torch.device("cpu"), steps_per_epoch=4, amp=amp,
                 channels_last=channels_last, log=None)
    tr.set_epoch(0)
    assert tr.fused is bool(fused) and tr.compile_math is (fused == "compiled")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    tr.train_step(x, y)
    named = {f"model.{n}": p for n, p in tr.model.named_parameters()}
    named.update({f"feature.{n}": p for n, p in tr.feature_loss.named_parameters()})
    grads = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in named.items()}
    return grads, params, tr.read_sums()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@contextlib.contextmanager
def _w_shape(w_shape: str):
    """Models build their binary convs with ``layers.make_conv``; make it use this ``w_shape``."""
    orig = layers_mod.make_conv
    layers_mod.make_conv = lambda *a, **kw: orig(*a, **{**kw, "w_shape": w_shape})
    try:
        yield
    finally:
        layers_mod.make_conv = orig


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("w_shape", ["kxk", "cin_kxk"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [True, "compiled"], ids=["fused", "compiled"])
def test_one_step_gradients_of_every_parameter_match_reference(channels_last, w_shape, amp, fused):
    if fused == "compiled" and (w_shape, channels_last) != ("kxk", True):
        pytest.skip("compiled math: one layout is enough on CPU (each compile takes seconds)")
    if fused == "compiled" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    with _w_shape(w_shape):
        ref_g, ref_p, ref_m = _step_grads({}, False, channels_last, amp)
        fus_g, fus_p, fus_m = _step_grads({}, fused, channels_last, amp)
    assert ref_g.keys() == fus_g.keys()
    ws = [g for n, g in ref_g.items() if n.endswith(".w")]
    assert len(ws) == 18, "WRN-22 has 18 binary convs"
    assert all(g.dim() == (2 if w_shape == "kxk" else 3) for g in ws)
    assert sum(n.endswith((".mu", ".sigma")) for n in ref_g) == 36
    tol = 2e-5 if not amp else 2e-3
    for n in ref_g:
        err = _rel_err(fus_g[n], ref_g[n])
        assert err < tol, (n, err)
        assert fus_g[n].stride() == ref_g[n].stride(), n
    for n in ref_p:
        assert _rel_err(fus_p[n], ref_p[n]) < tol, n
    for k in ("train_loss", "kernel_loss", "feature_loss", "ce_loss"):
        assert fus_m[k] == pytest.approx(ref_m[k], rel=1e-4 if not amp else 1e-3), k
    assert ref_m["kernel_loss"] > 0 and ref_m["feature_loss"] > 0
    if fused == "compiled":
        from trainables.fast.compiled import SafeCompiled

        assert SafeCompiled.failed is None, "the compiled math fell back to eager"


def _layers(dtype=torch.float64, channels_last=False, w_shape="kxk", seed=0):
    torch.manual_seed(seed)
    specs = [(3, 8, 3), (8, 8, 3), (8, 8, 3), (8, 16, 3), (16, 16, 1)]
    ls = [BonnConv2d(i, o, k, w_shape=w_shape).to(dtype) for i, o, k in specs]
    with torch.no_grad():
        for m in ls:
            m.w.mul_(torch.empty_like(m.w).uniform_(0.5, 1.5))  # non-constant w
            if channels_last:
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return ls


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("w_shape", ["kxk", "cin_kxk"])
def test_fused_kernels_and_gradients_equal_reference_float64(channels_last, w_shape):
    a = _layers(channels_last=channels_last, w_shape=w_shape)
    b = _layers(channels_last=channels_last, w_shape=w_shape)
    lam, nu = 0.3, 0.7
    kernels, loss = bonn_kernels_and_loss(a, lam, nu)
    ref_k = [BonnWeightBinarize.apply(m.weight, m.w) for m in b]
    ref_loss = bayesian_kernel_loss(b, lam, nu)
    for k, r, m in zip(kernels, ref_k, a):
        assert torch.equal(k, r)
        assert k.stride() == m.weight.stride(), "kernels are laid out like the latent weights"
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(k.shape, generator=g, dtype=k.dtype) for k in kernels]
    total = loss * 1.7 + sum((k * u).sum() for k, u in zip(kernels, upstream))
    ref_total = ref_loss * 1.7 + sum((k * u).sum() for k, u in zip(ref_k, upstream))
    total.backward()
    ref_total.backward()
    for ma, mb in zip(a, b):
        for name in ("weight", "w", "mu", "sigma"):
            ga, gb = getattr(ma, name).grad, getattr(mb, name).grad
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14, msg=name)


def test_fused_kernel_loss_alone_and_no_kernel_grads():
    a, b = _layers(), _layers()
    kernels, loss = bonn_kernels_and_loss(a, 0.5, 0.2)
    loss.backward()  # kernels unused: only the kernel-loss gradients
    bayesian_kernel_loss(b, 0.5, 0.2).backward()
    for ma, mb in zip(a, b):
        torch.testing.assert_close(ma.weight.grad, mb.weight.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ma.w.grad, mb.w.grad, rtol=1e-12, atol=1e-14)


def test_lam_zero_gives_only_binarizer_gradients():
    a, b = _layers(), _layers()
    kernels, loss = bonn_kernels_and_loss(a, 0.0, 0.2)
    assert loss.item() == 0.0
    sum(k.sum() for k in kernels).backward()
    sum(BonnWeightBinarize.apply(m.weight, m.w).sum() for m in b).backward()
    for ma, mb in zip(a, b):
        torch.testing.assert_close(ma.weight.grad, mb.weight.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ma.w.grad, mb.w.grad, rtol=1e-12, atol=1e-14)
        assert ma.mu.grad is None and ma.sigma.grad is None


def test_plans_follow_memory_layout():
    a = _layers(channels_last=False)
    c = _layers(channels_last=True)
    pa, pc = layer_plan(a), layer_plan(c)
    assert pa is not pc
    assert pa.perms[1] == (0, 1, 2, 3) and pc.perms[1] == (0, 2, 3, 1)
    assert [r.layers for r in pa.runs] == [1, 2, 1, 1]


def test_bf16_kernels_are_the_autocast_cast_of_the_reference():
    a = _layers(dtype=torch.float32)
    kernels, _ = bonn_kernels_and_loss(a, 1e-4, 1e-4, out_dtype=torch.bfloat16)
    for k, m in zip(kernels, a):
        assert k.dtype == torch.bfloat16
        assert torch.equal(k, BonnWeightBinarize.apply(m.weight, m.w).to(torch.bfloat16))


def test_every_momentum_parameter_has_a_buffer_from_the_start_and_after_a_resume():
    """Fused SGD (CUDA) cannot step a group where only some parameters have momentum buffers; the
    feature loss' log_var joins the momentum group 'slow' mid-training."""
    cfg = TrainConfig.from_dict({"model": "small_cnn", "width": 8, "device": "cpu", "epochs": 2,
                                 "feature_loss_start_epoch": 1, "cuda_graph": False})
    torch.manual_seed(0)
    tr = Trainer(cfg, build_model(cfg, 1, 10, 8), 10, torch.device("cpu"), steps_per_epoch=2, log=None)

    def missing():
        return [p.shape for g in tr.optimizer.param_groups if g["momentum"] != 0 for p in g["params"]
                if tr.optimizer.state[p].get("momentum_buffer") is None]

    assert not missing()
    sd = tr.state_dict()
    sd["optimizer"]["state"] = {}  # a checkpoint written before any step
    tr.load_state_dict(sd)
    assert not missing()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    tr.set_epoch(0)
    tr.train_step(x, y)
    tr.set_epoch(1)  # feature loss on: centres and log_var get gradients from now on
    tr.train_step(x, y)
    assert tr.feature_loss.log_var.grad is not None
    assert tr.optimizer.state[tr.feature_loss.log_var]["momentum_buffer"].abs().sum() > 0


def test_two_trainers_with_different_fused_bonn_do_not_interfere():
    """``fused_bonn`` is chosen per Trainer and passed down (no process-wide switch): the compiled
    activation sign goes to that Trainer's own layers only, and steps of Trainers with different
    settings, interleaved in one process, equal the steps of each Trainer run alone, bit for bit."""
    def trainer(fused):
        cfg = TrainConfig.from_dict({"model": "wrn22", "width": 16, "lam": 1e-2, "nu": 1e-1, "theta": 1e-2,
                                     "device": "cpu", "epochs": 2, "batch_size": 8, "fused_bonn": fused,
                                     "cuda_graph": False})
        torch.manual_seed(0)
        tr = Trainer(cfg, build_model(cfg, 3, 10, 16), 10, torch.device("cpu"), steps_per_epoch=4, log=None)
        tr.set_epoch(0)
        return tr

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]

    def state(tr):
        return {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    alone = {}
    for fused in (True, False):
        tr = trainer(fused)
        for x, y in batches:
            tr.train_step(x, y)
        alone[fused] = state(tr)
    a, b = trainer(True), trainer(False)
    c = trainer("compiled")  # built last: a process-wide switch would now hold for a and b too
    assert c.compile_math and not a.compile_math and not b.compile_math
    assert {m.act_sign is None for m in bonn_layers(c.model)} == {False}, "c's layers get the compiled sign"
    assert all(m.act_sign is None for tr in (a, b) for m in bonn_layers(tr.model))
    for x, y in batches:
        a.train_step(x, y)
        b.train_step(x, y)
    for tr, fused in ((a, True), (b, False)):
        for n, p in state(tr).items():
            assert torch.equal(p, alone[fused][n]), (fused, n)


REFERENCE_MODULES = ("binarize", "layers", "losses", "metrics", "models", "flat_layout")


def test_reference_math_never_imports_the_fast_path():
    """Dependency direction: trainables.fast -> reference, never back (no import, not even a lazy one)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[2] / "trainables"
    for name in REFERENCE_MODULES:
        for node in ast.walk(ast.parse((pkg / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not target.startswith((".fast", "trainables.fast")), (name, target)
                assert not (target == "." and any(a.name == "fast" for a in node.names)), name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("trainables.fast") for a in node.names), name
    code = ("import sys; " + "; ".join(f"import trainables.{m}" for m in REFERENCE_MODULES)
            + "; print([m for m in sys.modules if m.startswith('trainables.fast')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fused_step_applies_ste_clip_like_the_reference():
    """The Trainer passes ``ste_clip`` to the fused node: with a bound tight enough to mask part of the
    latent weights, the fused step gives the reference's gradients (it used to keep the paper's bound 1)."""
    ref_g, _, _ = _step_grads({"ste_clip": 0.01, "lam": 1e-4}, False, False, False)
    fus_g, _, _ = _step_grads({"ste_clip": 0.01, "lam": 1e-4}, True, False, False)
    wide_g, _, _ = _step_grads({"lam": 1e-4}, False, False, False)
    kernels = [n for n in ref_g if n.endswith(".weight") and n.replace(".weight", ".w") in ref_g]
    assert len(kernels) == 18
    assert any(_rel_err(ref_g[n], wide_g[n]) > 1e-2 for n in kernels), "the bound changed nothing"
    for n in ref_g:
        assert _rel_err(fus_g[n], ref_g[n]) < 2e-5, n
