"""The whole training step captured as a CUDA graph per batch shape, then replayed (``cuda_graph``).

A ``Trainer`` with ``use_graph`` hands each step to :meth:`CapturedSteps.run` with a key (batch shape
and dtype, feature-loss and kernel-loss state): the first ``warmup`` steps of a key run eagerly on a
side stream (lazy initialisation, cuDNN autotuning), the next one is captured and from then on the
step is replayed, with the batch copied into the graph's input tensors. The scheduler runs on the host
between replays and writes the learning rates into device tensors the graph reads (``Trainer``). A
capture that fails is logged once; the caller then trains eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["CapturedSteps"]


@dataclass
class _CapturedStep:
    """One training step captured as a CUDA graph, with the input tensors it reads."""

    x: torch.Tensor
    y: torch.Tensor
    graph: Any


class CapturedSteps:
    """The captured steps of one ``Trainer``, by key, with the warm-up counts and the capture stream."""

    def __init__(self, device: torch.device, log: Callable[[str], None] | None, warmup: int = 3) -> None:
        self.device, self.log, self.warmup = device, log, warmup
        self.graphs: dict[tuple, _CapturedStep] = {}
        self._seen: dict[tuple, int] = {}
        self._side_stream = None  # the warm-up steps' stream, made on first use
        self.failed: str | None = None  # why a capture failed (then the Trainer steps eagerly)

    def clear(self) -> None:
        """Forget captured steps (after tensors they read were replaced, e.g. by a state load)."""
        self.graphs.clear()
        self._seen.clear()

    def run(self, key: tuple, x: torch.Tensor, y: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor], None],
            zero_grad: Callable[[], None]) -> bool:
        """Do the step ``step(x, y)`` of ``key``: replay it, warm it up, or capture and replay it.

        ``step`` is the capturable device work of one step (no host sync, no ``zero_grad`` of its own).
        Returns ``False`` (nothing done, ``failed`` set, logged) if the capture failed: the caller
        must then run the step eagerly, now and from then on."""
        cap = self.graphs.get(key)
        if cap is not None:
            cap.x.copy_(x)
            cap.y.copy_(y)
            cap.graph.replay()
            return True
        seen = self._seen.get(key, 0)
        if seen < self.warmup:
            self._seen[key] = seen + 1
            # Eager steps before a capture run on a side stream (lazy initialisation, cuDNN autotuning).
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                zero_grad()
                step(x, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return True
        cap = _CapturedStep(x.clone(), y.clone(), torch.cuda.CUDAGraph())
        try:
            zero_grad()
            with torch.cuda.graph(cap.graph, capture_error_mode="thread_local"):
                step(cap.x, cap.y)
        except Exception as exc:  # noqa: BLE001 - fall back to eager steps, say so once
            self.failed = f"{type(exc).__name__}: {exc}"
            if self.log is not None:
                self.log(f"[I] cuda_graph: capture failed, training eagerly ({self.failed})")
            torch.cuda.synchronize(self.device)
            return False
        self.graphs[key] = cap
        cap.graph.replay()  # the capture recorded the step on this batch; run it
        return True
