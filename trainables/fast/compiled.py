"""``torch.compile`` with a way back: a compiled function that falls back to its eager twin.

Used for the optional compiled elementwise math of the training step on CUDA (``fused_bonn:
compiled``): if compiling or running the compiled version fails (no compiler, an unsupported op, a
torch version difference), a warning says why once and every later call runs the eager function,
which computes the same values. :func:`compiled_sign` is the activation ``sign`` of that mode; a
``Trainer`` passes it to its own binary layers (``trainables.layers.set_activation_sign``), so it
never affects another model in the process.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Callable

import torch

from ..binarize import sign, sign_traceable

__all__ = ["SafeCompiled", "compiled_sign"]


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


@lru_cache(maxsize=1)
def compiled_sign() -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`trainables.binarize.sign` whose CUDA calls run as one compiled kernel (instead of a compare
    and a ``where``); CPU tensors and calls inside a compiled region take the reference forms. Same values."""
    fast = SafeCompiled(sign_traceable, dynamic=True)

    def compiled_sign_(x: torch.Tensor) -> torch.Tensor:
        # binarize.sign already takes the traceable form inside a compiled region
        return fast(x) if x.is_cuda and not torch.compiler.is_compiling() else sign(x)

    return compiled_sign_
