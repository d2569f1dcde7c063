"""Disk used by the checkpoints of a study, before and after ``checkpoints: {keep, upload}`` (issue 17).

Builds the model and Trainer of a trial on the CPU (default: WRN-22-64 on CIFAR-10, the paper's
setting), runs one SGD step on random data so that the optimiser holds its momentum buffers, and
writes the checkpoint with trainables' own code (``trainables.checkpoint.save_checkpoint``, the file a
trial writes after every epoch, with a ``--epochs``-long metric history). Its size S then gives the
disk of a study of ``--trials`` trials of ``--epochs`` epochs:

* before (the defaults until issue 17): MLflow got every epoch's checkpoint (``upload: all``), Tune
  kept its best two by the objective plus the latest (``num_to_keep=2``): ``trials * (epochs + 3) * S``;
* after (``keep: best_and_last``, ``upload: best_and_last``): at most two per trial in each store,
  ``trials * (2 + 2) * S``.

No GPU and no data set needed (the input is random; only the model's shape matters)::

    python benchmarks/checkpoint_disk.py                       # WRN-22-64, 200 epochs, 16 trials
    python benchmarks/checkpoint_disk.py --width 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def checkpoint_bytes(model: str, width: int, epochs: int, dataset: str = "cifar10") -> int:
    """Bytes of the ``checkpoint.pt`` a trial of this model writes at its last epoch."""
    from trainables.checkpoint import save_checkpoint
    from trainables.config import TrainConfig
    from trainables.dynamics import Dynamics
    from trainables.models import build_model
    from trainables.train import Trainer

    cfg = TrainConfig.from_dict({"model": model, "width": width, "dataset": dataset, "data_root": "/nonexistent",
                                 "epochs": epochs, "batch_size": 8, "device": "cpu"})
    net = build_model(cfg, 3, 10, 32)
    trainer = Trainer(cfg, net, 10, torch.device("cpu"), steps_per_epoch=1, log=None)
    dynamics = Dynamics(trainer.model, trainer.group_parameters())
    dynamics.start_epoch()
    gen = torch.Generator().manual_seed(0)
    trainer.set_epoch(0)
    trainer.train_step(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    metrics = {"epoch": 1, **trainer.read_sums(), **dynamics.end_epoch()}
    history = [dict(metrics, epoch=e + 1) for e in range(epochs)]  # a full run's history travels in each file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        save_checkpoint(path, cfg, net.model_meta, epochs, trainer.state_dict(), gen,
                        {"val_acc": 0.9, "epoch": epochs}, history, dynamics.state_dict())
        return path.stat().st_size


def study_disk(size: int, trials: int, epochs: int) -> dict[str, float]:
    """Bytes per store, before and after, for a study whose trials all run ``epochs`` epochs."""
    before_mlflow, before_tune = trials * epochs * size, trials * 3 * size
    after_mlflow, after_tune = trials * 2 * size, trials * 2 * size
    return {"checkpoint_bytes": size, "before_mlflow": before_mlflow, "before_tune": before_tune,
            "before_total": before_mlflow + before_tune, "after_mlflow": after_mlflow, "after_tune": after_tune,
            "after_total": after_mlflow + after_tune}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wrn22")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    size = checkpoint_bytes(args.model, args.width, args.epochs)
    d = study_disk(size, args.trials, args.epochs)
    gb = 1e9
    print(f"{args.model}-{args.width}: checkpoint.pt = {size / 1e6:.1f} MB (torch {torch.__version__}, CPU)")
    print(f"study of {args.trials} trials x {args.epochs} epochs:")
    print("| | MLflow artifacts | Tune storage | total |\n|---|---|---|---|")
    print(f"| before (upload all, num_to_keep=2) | {d['before_mlflow'] / gb:.1f} GB | {d['before_tune'] / gb:.2f} GB "
          f"| {d['before_total'] / gb:.1f} GB |")
    print(f"| after (best_and_last, best_and_last) | {d['after_mlflow'] / gb:.2f} GB | {d['after_tune'] / gb:.2f} GB "
          f"| {d['after_total'] / gb:.2f} GB |")
    print(f"reduction: {d['before_total'] / d['after_total']:.0f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), **d}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
