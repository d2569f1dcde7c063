"""Does lam (the kernel-loss weight) move accuracy, next to the optimiser? Real data (scikit-learn's
digits), small CNN, 6 epochs, theta = 0, 3 seeds per value; the recipe of benchmarks/learning_cpu.py
(TUNED_RECIPE's Adam part) against the paper's SGD lr 0.01. Prints one line per (optimiser, lam).

    .venv/bin/python benchmarks/lam_digits.py      # about 2 minutes on 2 cores
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainables import fit  # noqa: E402

BASE = {"dataset": "digits", "model": "small_cnn", "epochs": 6, "batch_size": 64, "device": "cpu",
        "num_threads": 1, "hist_epochs": [], "latent_weight_decay": 0.0, "latent_init_scale": 0.1,
        "schedule": "cosine", "theta": 0.0}

for opt, lr in (("adam", 5e-3), ("sgd", 0.01)):
    for lam in (0.0, 1e-6, 1e-5, 1e-4, 1e-3):
        accs, flips = [], []
        for seed in (0, 1, 2):
            m = fit({**BASE, "optimizer": opt, "lr": lr, "lam": lam, "seed": seed}, log=lambda s: None)
            accs.append(m["test_acc"])
            flips.append(m["flip_frac_init"])
        print(f"{opt} lr={lr:g} lam={lam:g} test={[round(a, 3) for a in accs]} mean={sum(accs) / 3:.4f} "
              f"flipped_vs_init={sum(flips) / 3:.3f}", flush=True)
