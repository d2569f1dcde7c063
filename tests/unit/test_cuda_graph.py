"""The captured training step (``cuda_graph``) against eager steps, on a CUDA device.

Skipped where there is no GPU (CI); run on the GPU machine by ``benchmarks/gpu_issue9.sh``.
"""

from __future__ import annotations

import pytest
import torch

from trainables.config import TrainConfig
from trainables.models import build_model
from trainables.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(graph: bool, fused: bool, steps: int = 10, feature_from: int = 0, amp: bool = True, seed: int = 0):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    cfg = TrainConfig.from_dict({"model": "wrn22", "width": 16, "lam": 1e-2, "nu": 1e-1, "theta": 1e-2,
                                 "feature_loss_start_epoch": feature_from, "device": "cuda", "epochs": 2,
                                 "batch_size": 32, "lr": 0.05, "lr_milestones": [0.5], "lr_gamma": 0.1,
                                 "cuda_graph": graph, "fused_bonn": fused})
    dev = torch.device("cuda")
    torch.manual_seed(seed)
    model = build_model(cfg, 3, 10, 16)
    tr = Trainer(cfg, model, 10, dev, steps_per_epoch=steps // 2, amp=amp, channels_last=True, log=None)
    g = torch.Generator(device=dev).manual_seed(1)
    xs = torch.randn(steps, 32, 3, 16, 16, device=dev, generator=g)
    ys = torch.randint(0, 10, (steps, 32), device=dev, generator=g)
    lrs, sums = [], []
    for i in range(steps):
        if i % (steps // 2) == 0:
            tr.set_epoch(i // (steps // 2))
            tr.reset_sums()
        tr.train_step(xs[i], ys[i])
        lrs.append(tr.last_lr)
        if i % (steps // 2) == steps // 2 - 1:
            sums.append(tr.read_sums())
    params = {n: p.detach().float().clone() for n, p in tr.model.named_parameters()}
    return tr, params, lrs, sums


def _close(a: dict, b: dict, tol: float) -> None:
    for n in a:
        err = float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12))
        assert err < tol, (n, err)


def test_captured_steps_match_eager_steps_with_a_changing_lr():
    tr_g, p_g, lr_g, s_g = _run(graph=True, fused=True)
    tr_e, p_e, lr_e, s_e = _run(graph=False, fused=True)
    assert tr_g.use_graph and tr_g.captured.failed is None
    assert tr_g.captured.graphs, "no step was captured"
    assert lr_g == lr_e and lr_g[0] == pytest.approx(0.05) and lr_g[-1] == pytest.approx(0.005)
    _close(p_g, p_e, 2e-3)
    for a, b in zip(s_g, s_e):
        for k in ("train_loss", "ce_loss", "kernel_loss", "feature_loss", "train_acc"):
            assert a[k] == pytest.approx(b[k], rel=2e-3, abs=1e-6), k


def test_compiled_math_in_a_captured_step_matches_eager_math():
    from trainables.fast.compiled import SafeCompiled

    tr_c, p_c, _, s_c = _run(graph=True, fused="compiled")
    assert tr_c.compile_math and tr_c.captured.graphs and tr_c.captured.failed is None
    assert SafeCompiled.failed is None, SafeCompiled.failed
    _, p_e, _, s_e = _run(graph=False, fused=True)
    _close(p_c, p_e, 2e-3)
    assert s_c[-1]["train_loss"] == pytest.approx(s_e[-1]["train_loss"], rel=2e-3)


def test_fused_path_matches_reference_on_cuda():
    _, p_f, _, s_f = _run(graph=False, fused=True, steps=4)
    _, p_r, _, s_r = _run(graph=False, fused=False, steps=4)
    _close(p_f, p_r, 2e-3)
    assert s_f[-1]["kernel_loss"] == pytest.approx(s_r[-1]["kernel_loss"], rel=1e-3)


def test_feature_loss_switch_is_recaptured():
    tr, _, _, sums = _run(graph=True, fused=True, steps=16, feature_from=1)
    assert sums[0]["feature_loss"] == 0.0 and sums[1]["feature_loss"] > 0.0
    assert {k[3] for k in tr.captured.graphs} == {False, True}, "one graph per feature-loss state"


def test_state_dict_is_device_independent_and_resume_recaptures():
    tr, _, _, _ = _run(graph=True, fused=True, steps=8)
    sd = tr.state_dict()
    assert all(isinstance(g["lr"], float) for g in sd["optimizer"]["param_groups"])
    tr.load_state_dict(sd)
    assert not tr.captured.graphs
    assert all(torch.is_tensor(g["lr"]) and g["lr"].is_cuda for g in tr.optimizer.param_groups)
    x = torch.randn(32, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    for _ in range(tr.captured.warmup + 2):
        tr.train_step(x, y)
    assert tr.captured.graphs and tr.captured.failed is None
