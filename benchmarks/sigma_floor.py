"""The floor under the kernel prior's sigma (``sigma_min``): a configuration of the ``bonn-paper`` space that
diverged, and the paper's point, trained with the old floor (1e-8) and the new default (1e-4).

Why a floor matters: the prior term of the kernel loss pulls each |X_ik| towards mu_i with stiffness
``lam nu / sigma_i^2`` and moves sigma by ``lam nu / sigma_i (1 - mean d^2 / sigma_i^2)`` (Eqs. 13, 18).
Both grow without bound as sigma shrinks, and small latent weights start with a small sigma: an SGD step
(with momentum) can carry a sigma to or below zero, the clamp sets it to the floor, and at a floor of
1e-8 the next steps' prior gradients are ~1e9 times too large (NaN a few steps later).

Rows: each configuration x each floor (``auto``: the default, ``max(1e-4, sqrt(lr lam nu))``), ``fit`` on Fashion-MNIST (Debian ``dataset-fashion-mnist``), small
CNN, seed 0; prints val accuracy per epoch, whether training diverged, and the smallest sigma at init.
``--trace FLOOR``: instead, the diverged configuration step by step (smallest sigma, lr lam nu / sigma^2,
the loss) until it diverges or 400 steps.

    .venv/bin/python benchmarks/sigma_floor.py --data /usr/share/datasets/fashion-mnist --epochs 1 --jobs 2
    .venv/bin/python benchmarks/sigma_floor.py --trace 1e-8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: trial 2 of the Fashion-MNIST bonn-paper study (benchmarks/RESULTS.md), NaN in epoch 1 at the 1e-8 floor
DIVERGED = {"lam": 0.007156, "theta": 0.000342, "nu": 0.001469, "lr": 0.013049, "weight_decay": 0.000936,
            "optimizer": "sgd", "latent_init_scale": 0.04072}
#: the space's warm start: the paper's CIFAR values
PAPER = {"lam": 1e-4, "theta": 1e-3, "nu": 1e-4, "lr": 0.01, "weight_decay": 5e-4, "optimizer": "sgd",
         "latent_init_scale": 1.0}
#: trial 7 of the loss-weights study (recipe fixed at lr 0.6), NaN in epoch 1 at the 1e-4 floor
DIVERGED_AT_1E4 = {"lam": 0.0013, "theta": 0.0302, "nu": 0.00821, "lr": 0.6, "weight_decay": 0.0006,
                   "optimizer": "sgd", "latent_init_scale": 0.45}
CONFIGS = {"diverged trial": DIVERGED, "paper point": PAPER, "diverged at 1e-4": DIVERGED_AT_1E4}
FLOORS = (1e-8, 1e-4, "auto")


def _row(job: tuple[str, float, dict]) -> dict:
    import torch

    from trainables.train import fit

    from trainables.config import TrainConfig
    from trainables.layers import bonn_layers
    from trainables.models import build_model

    name, floor, base = job
    torch.set_num_threads(1)
    cfg = {**CONFIGS[name], **base, "sigma_min": floor}
    torch.manual_seed(0)
    init = bonn_layers(build_model(TrainConfig.from_dict(cfg), 1, 10, 28))
    sigma0 = min(float(m.sigma.detach().min()) for m in init)
    epochs: list[dict] = []
    t0 = time.monotonic()
    out = {"config": name, "sigma_min": floor, "floor": TrainConfig.from_dict(cfg).sigma_floor(),
           "params": CONFIGS[name], "initial_min_sigma": sigma0}
    try:
        res = fit(cfg, report=epochs.append, log=lambda _m: None)
        out.update(diverged=False, test_acc=res.get("test_acc"))
    except Exception as exc:  # noqa: BLE001 - TrainingDiverged is the finding
        out.update(diverged=True, error=f"{type(exc).__name__}: {str(exc)[:160]}")
    out["val_acc"] = [round(e["val_acc"], 4) for e in epochs]
    out["minutes"] = round((time.monotonic() - t0) / 60, 2)
    print(f"[row] {name} sigma_min={floor}: " + ("DIVERGED" if out["diverged"] else f"val {out['val_acc']}"),
          flush=True)
    return out


def trace(floor: float, base: dict, steps: int = 400) -> None:
    """The diverged configuration's first steps: smallest sigma and the prior term's stiffness per step."""
    import math

    import torch

    from trainables.config import TrainConfig
    from trainables.data import DeviceData
    from trainables.models import build_model
    from trainables.train import Trainer

    cfg = TrainConfig.from_dict({**DIVERGED, **base, "sigma_min": floor})
    dev = torch.device("cpu")
    data = DeviceData.from_config(cfg, dev)
    torch.manual_seed(cfg.seed)
    tr = Trainer(cfg, build_model(cfg, data.in_channels, data.num_classes, data.image_size), data.num_classes, dev,
                 steps_per_epoch=steps, log=None)
    tr.set_epoch(0)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    for i, (x, y) in enumerate(data.train_batches(cfg.batch_size, g)):
        tr.train_step(x, y)
        loss = tr.read_sums()["train_loss"]
        tr.reset_sums()
        sigma = min(float(m.sigma.detach().min()) for m in tr.layers)
        stiff = cfg.lr * cfg.lam * cfg.nu / sigma ** 2
        if i % 10 == 0 or not math.isfinite(loss) or sigma <= floor * 1.0001:
            print(f"step {i}: loss {loss:.4g}, smallest sigma {sigma:.3g}, lr*lam*nu/sigma^2 {stiff:.3g}", flush=True)
        if not math.isfinite(loss) or i + 1 >= steps:
            break


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"of {list(CONFIGS)}, comma-separated")
    ap.add_argument("--floors", default=",".join(str(f) for f in FLOORS),
                    help="sigma_min values (numbers or auto), comma-separated")
    ap.add_argument("--trace", type=float, default=None, metavar="FLOOR",
                    help="trace the diverged configuration at this sigma_min, step by step")
    a = ap.parse_args(argv)
    base = {"model": "small_cnn", "dataset": "fashion_mnist", "data_root": a.data, "epochs": a.epochs,
            "batch_size": 128, "binarize": "bonn", "device": "cpu", "seed": 0}
    if a.trace is not None:
        trace(a.trace, base)
        return 0
    jobs = [(n, f if f == "auto" else float(f), base) for n in a.configs.split(",") for f in a.floors.split(",")]
    with mp.get_context("spawn").Pool(a.jobs) as pool:
        rows = pool.map(_row, jobs)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    print(f"\nFashion-MNIST, small CNN, {a.epochs} epoch(s), batch 128, seed 0, CPU\n")
    print("| configuration | sigma_min | smallest sigma at init | val_acc per epoch | test_acc | diverged |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        test = f"{r['test_acc']:.4f}" if r.get("test_acc") is not None else "-"
        print(f"| {r['config']} | {r['sigma_min']} (floor {r['floor']:.2g}) | {r['initial_min_sigma']:.2g} | {' '.join(f'{v:.3f}' for v in r['val_acc']) or '-'} | "
              f"{test} | {'yes: ' + r['error'] if r['diverged'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
