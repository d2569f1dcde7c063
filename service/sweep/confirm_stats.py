"""The statistics of the confirmation stage: pure functions, no Ray, no MLflow.

* :func:`mean_std`: the mean and the sample standard deviation (``n - 1``) of a configuration's runs.
* :func:`welch_interval`: the difference of two means ``mean(a) - mean(b)`` with a two-sided
  ``level`` confidence interval by **Welch's t interval** (unequal variances): standard error
  ``se = sqrt(s_a^2/n_a + s_b^2/n_b)``, degrees of freedom by the Welch-Satterthwaite equation
  ``df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))``, interval ``d +- t_{df,(1+level)/2} se``.
  It needs two runs on each side; with ``se = 0`` (identical runs) the interval is the point itself.
  The t quantile is computed here (:func:`t_quantile`: the regularized incomplete beta function by
  its continued fraction, inverted by bisection), so neither the driver nor the API needs SciPy.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, sample std)``; std is None for fewer than 2 values, both None for none."""
    xs = [float(x) for x in xs]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1.0 - x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0 < p < 1) of Student's t with ``df`` degrees of freedom."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float | None]:
    """``{"diff", "low", "high", "df", "se"}`` for ``mean(a) - mean(b)``: Welch's t interval at ``level``.
    ``low``/``high``/``df``/``se`` are None when a side has fewer than 2 values; ``diff`` is None when a
    side has none."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    if ma is None or mb is None:
        return {"diff": None, "low": None, "high": None, "df": None, "se": None}
    diff = ma - mb
    if sa is None or sb is None:
        return {"diff": diff, "low": None, "high": None, "df": None, "se": None}
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "low": diff, "high": diff, "df": float(len(a) + len(b) - 2), "se": 0.0}
    df = se ** 4 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = t_quantile((1.0 + level) / 2.0, df) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df, "se": se}


LEVEL = 0.95
METHOD = "Welch's t interval (unequal variances), 95%"


def _stat(xs: list[float]) -> dict[str, Any]:
    m, s = mean_std(xs)
    return {"mean": m, "std": s, "n": len(xs)}


def summarize(plan: dict[str, Any], runs: dict[str, dict[str, Any]], final: bool = False) -> dict[str, Any]:
    """The confirmation as ``GET /studies/{id}`` shows it, from the plan and the finished runs.

    ``best`` is the candidate with the highest mean ``val_acc`` (never test accuracy); ``difference``
    is best - reference on ``test_acc`` (``difference_val`` on ``val_acc``), each with its interval.
    ``status``: ``complete`` (every run recorded), ``running``, or with ``final`` (the stage has ended)
    ``incomplete`` (runs failed; a resume runs them again).
    """
    confs = []
    labels = {c["label"] for c in plan.get("configs", [])}
    runs = {k: r for k, r in runs.items() if r.get("label") in labels}  # (runs of an earlier plan)
    for c in plan.get("configs", []):
        rs = sorted((r for r in runs.values() if r.get("label") == c["label"]), key=lambda r: r["seed"])
        confs.append({
            **c,
            "runs": [{k: r.get(k) for k in ("seed", "val_acc", "test_acc", "mlflow_run_id", "tune_trial_id")} for r in rs],
            "val_acc": _stat([r["val_acc"] for r in rs if r.get("val_acc") is not None]),
            "test_acc": _stat([r["test_acc"] for r in rs if r.get("test_acc") is not None]),
        })
    expected = len(plan.get("configs", [])) * len(plan.get("seeds", []))
    cands = [c for c in confs if "candidate" in c["role"] and c["val_acc"]["mean"] is not None]
    best = max(cands, key=lambda c: (c["val_acc"]["mean"], -(c["trial"] or 0))) if cands else None
    ref = next((c for c in confs if "reference" in c["role"]), None)

    def diff(metric: str) -> dict[str, Any] | None:
        if best is None or ref is None:
            return None
        if best is ref:  # the search's pick is the reference point itself
            return {"metric": metric, "diff": 0.0, "low": 0.0, "high": 0.0, "df": None, "se": 0.0,
                    "level": LEVEL, "method": "best is the reference configuration"}
        a = [r[metric] for r in best["runs"] if r.get(metric) is not None]
        b = [r[metric] for r in ref["runs"] if r.get(metric) is not None]
        return {"metric": metric, **welch_interval(a, b, LEVEL), "level": LEVEL, "method": METHOD}

    return {
        "status": "complete" if expected and len(runs) >= expected else ("incomplete" if final else "running"),
        "seeds": list(plan.get("seeds", [])), "epochs": plan.get("epochs"), "experiment": plan.get("experiment"),
        "runs_done": len(runs), "runs_total": expected,
        "configurations": confs, "best": best["label"] if best else None, "reference": ref["label"] if ref else None,
        "difference": diff("test_acc"), "difference_val": diff("val_acc"),
    }


def _pm(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.4f}" + (f" +- {s['std']:.4f}" if s["std"] is not None else "") + f" (n={s['n']})"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as text lines (the driver's log)."""
    out = [f"confirmation over seeds {summary['seeds']} ({summary['runs_done']}/{summary['runs_total']} runs):"]
    for c in summary["configurations"]:
        out.append(f"  {c['label']:<12} {c['role']:<20} val_acc {_pm(c['val_acc'])}  test_acc {_pm(c['test_acc'])}")
    d = summary.get("difference")
    if d and d.get("diff") is not None:
        ci = f" [{d['low']:+.4f}, {d['high']:+.4f}]" if d.get("low") is not None else " (no interval: < 2 runs)"
        out.append(f"  best ({summary['best']}) - reference, test_acc: {d['diff']:+.4f}{ci} ({d['method']})")
    return out
