"""The Ray Tune function trainable around ``fit`` (the only module of ``trainables`` that imports Ray).

``train_bonn(config)`` restores from ``ray.tune.get_checkpoint()`` by copying its ``checkpoint.pt`` into
a fresh local folder, then runs ``fit(config, report, checkpoint_dir=that folder)``; after every epoch
``fit`` writes the checkpoint (and the epoch's histogram PNG) there and ``report`` hands the folder to
``ray.tune.report(metrics, checkpoint=Checkpoint.from_directory(folder))``, which persists a copy to
the run's storage before returning. The local folder is removed when the trial ends.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .train import CHECKPOINT_NAME, fit

__all__ = ["train_bonn"]


def train_bonn(config: Mapping[str, Any]) -> None:
    from ray import tune

    local = Path(tempfile.mkdtemp(prefix="bonn-trial-"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                src = Path(d) / CHECKPOINT_NAME
                if src.exists():
                    shutil.copy2(src, local / CHECKPOINT_NAME)

        def report(metrics: dict) -> None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(local)))

        fit(dict(config), report=report, checkpoint_dir=local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
