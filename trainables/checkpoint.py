"""Checkpoints of ``fit``: the file, the RNG states in it, the weight-histogram PNGs beside it.

``checkpoint_dir/checkpoint.pt``, written atomically after every epoch: model, optimiser, scheduler,
feature-loss state, RNG states (torch CPU, CUDA, NumPy, Python, the data generator), epoch, best
validation accuracy and the metric history. Loadable with ``torch.load(weights_only=True)``. If the
file exists when ``fit`` starts, training resumes from it and continues exactly as the uninterrupted
run would. Histogram PNGs (``weights_hist_epoch{E:03d}.png``, paper Fig. 3) are written after epochs
listed in ``hist_epochs``; the epoch-0 plot (initial weights) travels with the first checkpoint of a
fresh run; every later checkpoint carries only its own epoch's plot. The format is pinned in
docs/contracts.md.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from .config import TrainConfig
from .metrics import save_weight_histogram
from .models import build_model

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "atomic_save", "hist_name", "load_checkpoint",
           "load_checkpoint_model", "remove_stale_histograms", "rng_state", "save_checkpoint", "seed_everything",
           "set_rng_state", "write_histogram"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: latent group, center optimiser, dynamics state


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the start of every fresh ``fit``)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG state a resume needs, as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
          "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Mapping[str, Any], data_gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(st["torch"])
    data_gen.set_state(st["data"])
    npst = st["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    random.setstate((st["python_version"], tuple(st["python"]), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a reader never sees half a checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_histogram(w, path: Path, epoch: int, title: str, log) -> None:
    """Fig.-3 histogram; a missing matplotlib costs the plot (with a warning), never the training."""
    try:
        save_weight_histogram(w, path, epoch, title=title)
    except ImportError as e:
        log(f"[warn] weight histogram of epoch {epoch} not written: {e}")


def hist_name(epoch: int) -> str:
    return f"weights_hist_epoch{epoch:03d}.png"


def remove_stale_histograms(folder: Path, keep: set[int]) -> None:
    for p in folder.glob("weights_hist_epoch*.png"):
        try:
            e = int(p.stem[len("weights_hist_epoch"):])
        except ValueError:
            continue
        if e not in keep:
            p.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """The checkpoint dict (``weights_only``; on the CPU by default, so RNG states stay CPU tensors)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model (CPU, eval mode) and its config dict from a ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    ck = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ck["config"])
    model = build_model(cfg, **ck["model_meta"])
    model.load_state_dict(ck["trainer"]["model"])
    model.eval()
    return model, ck["config"]


def save_checkpoint(path: Path, cfg: TrainConfig, model_meta: Mapping[str, Any], epoch: int,
                    trainer_state: Mapping[str, Any], data_gen: torch.Generator, best: Mapping[str, Any],
                    history: list, dynamics_state: Mapping[str, Any]) -> None:
    """Write the checkpoint after ``epoch`` (1-based, the number of epochs done) atomically."""
    atomic_save({"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model_meta": model_meta,
                 "epoch": epoch, "trainer": trainer_state, "rng": rng_state(data_gen),
                 "best": best, "history": history, "dynamics": dynamics_state}, path)
