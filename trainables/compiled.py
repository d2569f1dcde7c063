"""``torch.compile`` with a way back: a compiled function that falls back to its eager twin.

Used for the optional compiled elementwise math of the training step on CUDA (``fused_bonn:
compiled``): if compiling or running the compiled version fails (no compiler, an unsupported op, a
torch version difference), a warning says why once and every later call runs the eager function,
which computes the same values.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

__all__ = ["SafeCompiled"]


class SafeCompiled:
    """``SafeCompiled(fn, **compile_kwargs)(*args)``: ``torch.compile(fn)(*args)``, or ``fn(*args)`` for
    good once that raised."""

    failed: str | None = None  # the first failure in this process (all instances share the fallback)

    def __init__(self, fn: Callable[..., Any], **compile_kwargs: Any) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, **compile_kwargs)

    def __call__(self, *args: Any) -> Any:
        if SafeCompiled.failed is None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - a compile problem must not stop a training
                SafeCompiled.failed = f"{type(exc).__name__}: {exc}"[:500]
                warnings.warn(f"trainables: compiled math failed, using eager math ({SafeCompiled.failed})",
                              RuntimeWarning, stacklevel=2)
        return self.eager(*args)
