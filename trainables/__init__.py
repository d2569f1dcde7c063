"""PyTorch core of bonn-sweep: BONN layers and losses, models, data, ``fit``.

``fit``, ``load_checkpoint_model`` and ``TrainingDiverged`` are imported lazily (``import trainables``
pulls in neither torch nor Ray); ``trainables.tune`` is the only module that imports ``ray``.
"""

from .config import TRIAL_CONFIG_KEYS, ConfigError, TrainConfig

__all__ = ["fit", "ConfigError", "TrainingDiverged", "TrainConfig", "TRIAL_CONFIG_KEYS",
           "load_checkpoint_model"]

_LAZY = {"fit": "train", "TrainingDiverged": "train", "load_checkpoint_model": "checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
