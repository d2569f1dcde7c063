"""Bimodality of latent weights and the latent-weight histogram (paper Fig. 3).

Both look at the latent (full-precision) weights ``X`` of the **first binarized 3x3 conv** of the
model (``trainables.models.backbone_convs(model)[0]``; for ``binarize="none"`` the conv at the same
position), as the paper's Fig. 3 does.

``bimodality`` (reported every epoch) is Sarle's bimodality coefficient of the flattened weights:

    BC = (g^2 + 1) / (k + 3 (n - 1)^2 / ((n - 2)(n - 3)))

with ``g`` the sample skewness and ``k`` the sample excess kurtosis (both with the usual small-sample
corrections; SAS/Pfister et al. 2013). BC = 1/3 for a Gaussian, 5/9 for a uniform distribution, and
it approaches 1 for two well-separated modes; BC > 5/9 is the customary hint of bimodality. A BONN
layer should move from ~1/3 at epoch 0 towards 1 as its weights split into the two modes ``±mu``;
an XNOR layer stays unimodal (paper Fig. 4).

The histogram PNG overlays a symmetric-start two-component Gaussian mixture fitted by EM (the dashed
curves of Fig. 3) and prints BC and the mixture's separation ``|m1 - m2| / (s1 + s2)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["bimodality_coefficient", "fit_gmm2", "first_binary_weights", "save_weight_histogram"]


def bimodality_coefficient(x: torch.Tensor | np.ndarray) -> float:
    """Sarle's bimodality coefficient of the flattened ``x`` (see the module docstring); NaN if n < 4
    or the values are constant."""
    t = torch.as_tensor(x).detach().flatten().double()
    n = t.numel()
    if n < 4:
        return float("nan")
    d = t - t.mean()
    m2 = (d * d).mean()
    if m2 <= 0:
        return float("nan")
    m3, m4 = (d ** 3).mean(), (d ** 4).mean()
    g1 = m3 / m2 ** 1.5
    g2 = m4 / m2 ** 2 - 3.0
    skew = g1 * math.sqrt(n * (n - 1)) / (n - 2)
    kurt = ((n + 1) * g2 + 6) * (n - 1) / ((n - 2) * (n - 3))
    bc = (skew ** 2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    return float(bc)


def first_binary_weights(model: torch.nn.Module) -> torch.Tensor | None:
    """Latent weights of the first 3x3 backbone conv (detached, float32, on the CPU)."""
    from .models import backbone_convs

    convs = backbone_convs(model)
    if not convs:
        return None
    return convs[0].weight.detach().float().cpu()


def fit_gmm2(x: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EM for a 1-D two-component Gaussian mixture started at ``±mean|x|``; returns (weights, means, stds)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    a = np.abs(x).mean() or 1e-3
    mu = np.array([-a, a])
    sd = np.array([x.std() or 1e-3] * 2)
    pi = np.array([0.5, 0.5])
    for _ in range(iters):
        logp = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(pi)
        logp -= logp.max(axis=1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(axis=1, keepdims=True)
        nk = r.sum(axis=0) + 1e-12
        pi = nk / len(x)
        mu = (r * x[:, None]).sum(axis=0) / nk
        sd = np.sqrt((r * (x[:, None] - mu) ** 2).sum(axis=0) / nk) + 1e-12
    return pi, mu, sd


def save_weight_histogram(weights: torch.Tensor | np.ndarray, path: str | Path, epoch: int,
                          title: str = "") -> Path:
    """Write the Fig.-3-style histogram of ``weights`` to ``path`` (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x = np.asarray(torch.as_tensor(weights).detach().float().cpu().numpy()).ravel()
    bc = bimodality_coefficient(x)
    pi, mu, sd = fit_gmm2(x)
    sep = abs(mu[1] - mu[0]) / (sd[0] + sd[1])
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    ax.hist(x, bins=100, density=True, color="#4c72b0", alpha=0.75)
    grid = np.linspace(x.min(), x.max(), 400)
    for p, m, s in zip(pi, mu, sd):
        ax.plot(grid, p * np.exp(-0.5 * ((grid - m) / s) ** 2) / (s * math.sqrt(2 * math.pi)), "k--", lw=1)
    ax.set_xlabel("latent weight")
    ax.set_ylabel("density")
    ax.set_title(f"{title + ' ' if title else ''}epoch {epoch}: BC={bc:.3f}, "
                 f"modes {mu[0]:+.4f}/{mu[1]:+.4f}, sep={sep:.2f}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
