"""The paper's CIFAR-10 table (Table 3 rows and the lambda/theta ablation, bonn-method.md §6.2/6.4),
run as concurrent trainings on one GPU with `trainables.fit`, on the CIFAR-10 JPEG copy of data.md.

Rows (WRN-22, 16-16-32-64, the recipe of ``--recipe`` scaled to --epochs, nu = 1e-4; the feature loss
only in the fine-tuning phase, i.e. from --finetune-start (fraction of the epochs) on):

    fp             binarize=none                        paper 91.66
    bnn_plain      binarize=bonn, lam=0, theta=0        paper 84.97  (lambda = 0 row of the ablation)
    xnor           binarize=xnor                        paper 81.90
    bonn_kernel    binarize=bonn, lam=1e-4, theta=0     paper 86.23
    bonn_both      binarize=bonn, lam=1e-4, theta=1e-2  paper 87.34  (theta = 1e-2 row)
    theta_1e-3     lam=1e-4, theta=1e-3                 paper 86.49  (theta ablation)
    theta_1e-4     lam=1e-4, theta=1e-4                 paper 86.27
    both_literal   bonn_both with the paper's literal recipe (SGD lr 0.01, step x0.2, Kaiming latent init)

``--recipe tuned`` (default) is benchmarks/learning_cpu.py's TUNED_RECIPE (Adam, latent init x0.1 without
weight decay, cosine, Bi-Real shortcuts); ``--recipe paper`` the literal one for every row.
Test accuracy is evaluated once, at the last epoch; validation (10 % of the training split) for
everything else. Each row checkpoints every epoch into --out/ROW/ckpt: rerunning the same command resumes
unfinished rows from their checkpoints (finished rows return at once).

Prints a markdown table (test accuracy at the last epoch, best val accuracy, epochs, seed, minutes)
and writes per-epoch logs (JSON lines), the latent-weight histogram PNGs (paper Fig. 3) of the first
binary conv for lam=1e-4 (bonn_kernel) and lam=0 (bnn_plain), and results.json into --out.

    python benchmarks/cifar10_table.py --data .data/cifar10.npz --epochs 200 --out benchmarks/out/cifar10
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_cpu import PAPER_RECIPE, TUNED_RECIPE  # noqa: E402

PAPER = {"fp": 91.66, "bnn_plain": 84.97, "xnor": 81.90, "bonn_kernel": 86.23, "bonn_both": 87.34,
         "theta_1e-3": 86.49, "theta_1e-4": 86.27, "both_literal": 87.34}
ROWS = {
    "fp": dict(binarize="none", lam=0.0, theta=0.0),
    "bnn_plain": dict(binarize="bonn", lam=0.0, theta=0.0),
    "xnor": dict(binarize="xnor", lam=0.0, theta=0.0),
    "bonn_kernel": dict(binarize="bonn", lam=1e-4, theta=0.0),
    "bonn_both": dict(binarize="bonn", lam=1e-4, theta=1e-2),
    "theta_1e-3": dict(binarize="bonn", lam=1e-4, theta=1e-3),
    "theta_1e-4": dict(binarize="bonn", lam=1e-4, theta=1e-4),
    "both_literal": dict(PAPER_RECIPE, binarize="bonn", lam=1e-4, theta=1e-2),
}
LABEL = {
    "fp": "WRN-22 full precision",
    "bnn_plain": "1-bit, lam = theta = 0",
    "xnor": "XNOR-Net",
    "bonn_kernel": "BONN, kernel loss only (lam=1e-4)",
    "bonn_both": "BONN, both losses (lam=1e-4, theta=1e-2)",
    "theta_1e-3": "BONN, lam=1e-4, theta=1e-3",
    "theta_1e-4": "BONN, lam=1e-4, theta=1e-4",
    "both_literal": "BONN, both losses, the paper's literal recipe",
}


def _run_row(name: str, args_dict: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import trainables

    out = Path(args_dict["out"]) / name
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    epochs = args_dict["epochs"]
    recipe = TUNED_RECIPE if args_dict["recipe"] == "tuned" else PAPER_RECIPE
    cfg = dict(recipe)
    cfg.update(
        model="wrn22", width=args_dict["width"], dataset="npz", data_root=args_dict["data"],
        epochs=epochs, batch_size=args_dict["batch_size"], nu=1e-4,
        seed=args_dict["seed"], val_fraction=0.1, compile=args_dict["compile"],
        num_threads=args_dict["threads"],
        feature_loss_start_epoch=int(round(args_dict["finetune_start"] * epochs)),
        hist_epochs=sorted({0, 2, 20, epochs, 200} & set(range(epochs + 1))),
    )
    cfg.update(ROWS[name])
    log = (out / "epochs.jsonl").open("a")

    def report(m: dict) -> None:
        log.write(json.dumps(m) + "\n"); log.flush()
        print(f"[{name}] epoch {m['epoch']:>3} val_acc {m['val_acc']:.4f} train_loss {m['train_loss']:.4f} "
              f"{m['images_per_s']:.0f} img/s", flush=True)
        for png in ckpt.glob("weights_hist_epoch*.png"):
            shutil.copy(png, out / png.name)

    t0 = time.time()
    final = trainables.fit(cfg, report=report, checkpoint_dir=str(ckpt))
    final["wall_min"] = (time.time() - t0) / 60
    final["config"] = cfg
    (out / "final.json").write_text(json.dumps(final, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 .npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-start", type=float, default=0.5,
                   help="fraction of the epochs after which the feature loss is on (paper: fine-tuning)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--recipe", choices=("tuned", "paper"), default="tuned")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per training (0 = leave; 1 for CPU dry runs of several rows)")
    p.add_argument("--out", default="benchmarks/out/cifar10")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = {r: ctx.Process(target=_run_row, args=(r, vars(args))) for r in rows}
    t0 = time.time()
    for pr in procs.values():
        pr.start()
    for pr in procs.values():
        pr.join()
    wall = (time.time() - t0) / 60

    lines = ["| row | test acc (%) | best val acc (%) | paper (%) | epochs | seed | minutes |",
             "|---|---|---|---|---|---|---|"]
    results = {}
    for r in rows:
        f = Path(args.out) / r / "final.json"
        if not f.exists():
            lines.append(f"| {LABEL[r]} | failed (exit {procs[r].exitcode}) | | {PAPER[r]} | | | |")
            continue
        m = json.loads(f.read_text())
        results[r] = m
        best_val = max(json.loads(l)["val_acc"] for l in (Path(args.out) / r / "epochs.jsonl").read_text().splitlines())
        lines.append(f"| {LABEL[r]} | {100 * m['test_acc']:.2f} | {100 * best_val:.2f} | {PAPER[r]} | "
                     f"{m['epoch']} | {args.seed} | {m['wall_min']:.1f} |")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nCIFAR-10 (JPEG copy), WRN-22 width {args.width}, batch {args.batch_size}, "
          f"{len(rows)} trainings sharing one device, {wall:.1f} min wall")
    print("\n".join(lines))
    return 0 if len(results) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
