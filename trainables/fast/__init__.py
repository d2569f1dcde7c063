"""The fast path of the training step: same numbers as the reference math, fewer GPU kernels.

* :mod:`trainables.fast.fused` — every BONN layer's binary kernel and the Bayesian kernel loss in one
  autograd node over one flat vector (the reference: ``trainables.binarize``, ``trainables.losses``);
* :mod:`trainables.fast.compiled` — ``torch.compile`` with a fallback to the eager twin, and the
  compiled activation ``sign`` a ``Trainer`` hands to its own layers;
* :mod:`trainables.fast.cuda_graph` — the whole training step captured as a CUDA graph and replayed;
* :mod:`trainables.fast.multi_trial` — a prototype: K trials of one architecture stacked into one model
  (grouped convolutions, per-member losses and optimiser), trained by one step (docs/multi-trial.md).

Dependency direction: this package imports the reference modules, never the other way round
(``tests/unit/test_fused.py`` checks the fused step against the reference, gradient by gradient).
"""
