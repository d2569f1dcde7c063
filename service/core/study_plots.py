"""Plots of an Optuna study, from Optuna's own visualization module, for the driver and the report.

:func:`render` draws a study -- the optimization history, the parameter importances (fANOVA, seed 0),
parallel coordinates, a contour of ``lam`` x ``theta`` (else of the two most important parameters),
slices, and the intermediate values (every trial's learning curve; pruned trials dotted and marked with
an x where ASHA stopped them) -- as PNGs (``optuna.visualization.matplotlib``, Agg backend) and one
self-contained interactive HTML page (``optuna.visualization``, plotly; plotly.js inlined once, so the
page works offline). :func:`figures_html` gives the same plots as HTML fragments (the study report,
``service.core.report``). Optuna, plotly and matplotlib are imported lazily: the API starts light.

Each drawing reads the study once: :func:`render` (and the report) work on :func:`snapshot`, an
in-memory copy of its trials, so a refresh costs one read of the storage however many plots query
the trials; and fANOVA is fitted once per drawing (:func:`fanova_once`), though the importances, the
PNG and the HTML importance plot all ask for it.

Plots need at least two finished trials with a value; a plot Optuna cannot draw for the study (a
contour with one searched parameter) is left out and named in ``skipped``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, Callable

logger = logging.getLogger("bonn_sweep.plots")

#: the plots, in the order of the report and the HTML page
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "contour", "slice",
         "intermediate_values")  # a multi-objective study: "pareto_front" instead of "intermediate_values"
CONTOUR_PARAMS = ("lam", "theta")


def finished_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def primary_target(study) -> Callable | None:
    """For a multi-objective study, the primary objective (Optuna's plots need one target); else None."""
    return (lambda t: t.values[0]) if len(study.directions) > 1 else None


def snapshot(study):
    """An in-memory copy of ``study`` (its trials, directions, name and user attrs), read from its storage
    once: what every plot of one drawing queries."""
    import optuna

    copy = optuna.create_study(directions=study.directions, study_name=study.study_name)
    copy.add_trials(study.get_trials(deepcopy=False))
    for k, v in study.user_attrs.items():
        copy.set_user_attr(k, v)
    return copy


def fanova_once():
    """An importance evaluator that fits fANOVA (seed 0) once and answers every later call from that fit
    (one drawing: the importances, and the importance plot of each backend)."""
    from optuna.importance import BaseImportanceEvaluator, FanovaImportanceEvaluator

    class FanovaOnce(BaseImportanceEvaluator):
        def __init__(self) -> None:
            self._inner = FanovaImportanceEvaluator(seed=0)
            self._cache: dict[tuple | None, dict[str, float]] = {}
            self.fits = 0

        def evaluate(self, study, params=None, *, target=None) -> dict[str, float]:
            key = tuple(params) if params is not None else None
            if key not in self._cache:
                self.fits += 1
                self._cache[key] = self._inner.evaluate(study, params=params, target=target)
            return dict(self._cache[key])

    return FanovaOnce()


def importances(study, evaluator=None) -> dict[str, float]:
    """fANOVA importance of each searched parameter (over COMPLETE trials; seed 0); {} when it cannot be had.
    ``evaluator``: a :func:`fanova_once` of the drawing, so later plots reuse the fit."""
    import optuna

    if len([t for t in finished_trials(study) if t.state.name == "COMPLETE"]) < 2:
        return {}  # fANOVA over one point says nothing
    try:
        ev = evaluator or optuna.importance.FanovaImportanceEvaluator(seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study, evaluator=ev, target=primary_target(study))
        return {k: float(v) for k, v in imp.items()}
    except (ValueError, RuntimeError, ImportError) as exc:  # too few trials, one param, no sklearn
        logger.info("no parameter importances yet: %s", exc)
        return {}


def contour_params(study, imp: dict[str, float]) -> list[str] | None:
    """``lam`` x ``theta`` when both are searched, else the two most important parameters."""
    names = set()
    for t in finished_trials(study):
        names |= set(t.params)
    if set(CONTOUR_PARAMS) <= names:
        return list(CONTOUR_PARAMS)
    top = [k for k in imp if k in names][:2]
    return top if len(top) == 2 else None


def _figures(study, imp: dict[str, float], target_name: str, backend, ev=None) -> dict[str, Callable[[], Any]]:
    ev = ev or fanova_once()
    pair = contour_params(study, imp)
    tg = {"target": primary_target(study), "target_name": target_name}
    figs: dict[str, Callable[[], Any] | None] = {
        "optimization_history": lambda: backend.plot_optimization_history(study, **tg),
        "param_importances": (lambda: backend.plot_param_importances(study, evaluator=ev, **tg)) if imp else None,
        "parallel_coordinate": lambda: backend.plot_parallel_coordinate(study, **tg),
        "contour": (lambda: backend.plot_contour(study, params=pair, **tg)) if pair else None,
        "slice": lambda: backend.plot_slice(study, **tg),
        "intermediate_values": lambda: backend.plot_intermediate_values(study),
    }
    if len(study.directions) > 1:  # multi-objective: the Pareto front; no intermediate values
        names = objective_names(study, target_name)
        figs["pareto_front"] = lambda: backend.plot_pareto_front(study, target_names=names)
        del figs["intermediate_values"]
    return figs


def objective_names(study, primary: str) -> list[str]:
    """The objectives' names (the driver stores them as the study's ``objective_names`` user attr)."""
    names = study.user_attrs.get("objective_names")
    if isinstance(names, list) and len(names) == len(study.directions):
        return [str(n) for n in names]
    return [primary] + [f"objective {i}" for i in range(1, len(study.directions))]


def _pruned(study) -> dict[int, tuple[int, float]]:
    """Pruned trial number -> (last step, last intermediate value)."""
    from optuna.trial import TrialState

    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if t.intermediate_values:
            step = max(t.intermediate_values)
            out[t.number] = (step, t.intermediate_values[step])
    return out


def _mark_pruned_plotly(fig, pruned: dict[int, tuple[int, float]]) -> None:
    import plotly.graph_objects as go

    for tr in fig.data:
        num = _trial_number(getattr(tr, "name", "") or "")
        if num in pruned:
            tr.update(line={"dash": "dot"}, name=f"Trial{num} (pruned)")
    if pruned:
        fig.add_trace(go.Scatter(x=[s for s, _ in pruned.values()], y=[v for _, v in pruned.values()], mode="markers",
                                 marker={"symbol": "x", "size": 11, "color": "#d62728"}, name="pruned (ASHA)"))


def _mark_pruned_mpl(ax, pruned: dict[int, tuple[int, float]]) -> None:
    for line in ax.get_lines():
        if _trial_number(line.get_label()) in pruned:
            line.set_linestyle(":")
            line.set_label(f"{line.get_label()} (pruned)")
    if pruned:
        ax.scatter([s for s, _ in pruned.values()], [v for _, v in pruned.values()], marker="x", s=60,
                   color="#d62728", zorder=5, label="pruned (ASHA)")
        ax.legend(fontsize=6, loc="best")


def _trial_number(label: str) -> int | None:
    digits = "".join(c for c in label.replace("Trial", "", 1).split(" ")[0] if c.isdigit())
    return int(digits) if label.startswith("Trial") and digits else None


def render(study, out_dir: str, target_name: str = "val_acc", png: bool = True, html: bool = True) -> dict[str, Any]:
    """Draw the study into ``out_dir``: ``<plot>.png``, ``study.html``, ``importances.json``.
    Returns ``{"plots": [names drawn], "skipped": {name: why}, "importances": {...}, "html": path|None,
    "finished": finished trials drawn}``."""
    import optuna

    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {"plots": [], "skipped": {}, "importances": {}, "html": None}
    study = snapshot(study)
    result["finished"] = len(finished_trials(study))
    if result["finished"] < 2:
        result["skipped"] = {name: "fewer than two finished trials" for name in PLOTS}
        return result
    ev = fanova_once()
    imp = importances(study, ev)
    result["importances"] = imp
    with open(os.path.join(out_dir, "importances.json"), "w") as f:
        json.dump({"evaluator": "fanova", "seed": 0, "importances": imp}, f, indent=2)
    pruned = _pruned(study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
        if png:
            _render_png(study, imp, target_name, pruned, out_dir, result, ev)
        if html:
            _render_html(study, imp, target_name, pruned, out_dir, result, ev)
    result["fanova_fits"] = ev.fits
    return result


def _render_png(study, imp, target_name, pruned, out_dir, result, ev) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as mpl_backend

    for name, make in _figures(study, imp, target_name, mpl_backend, ev).items():
        if make is None:
            result["skipped"][name] = ("needs two completed trials" if name == "param_importances"
                                       else "needs two searched parameters")
            continue
        try:
            ax = make()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            if name == "intermediate_values":
                _mark_pruned_mpl(ax, pruned)
            fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 4.5))
            fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100, bbox_inches="tight")
            result["plots"].append(name)
        except Exception as exc:  # noqa: BLE001 - one plot Optuna cannot draw never costs the others
            result["skipped"][name] = f"{type(exc).__name__}: {exc}"
        finally:
            plt.close("all")


def figures_html(study, imp: dict[str, float], target_name: str = "val_acc", ev=None,
                 pruned: dict[int, tuple[int, float]] | None = None) -> dict[str, str]:
    """Each plot as an HTML ``<div>`` (plotly, without plotly.js: the page includes it once). Pass a
    :func:`snapshot` and the drawing's :func:`fanova_once` to read the storage and fit fANOVA once."""
    from optuna import visualization as plotly_backend

    out = {}
    pruned = _pruned(study) if pruned is None else pruned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in _figures(study, imp, target_name, plotly_backend, ev).items():
            if make is None:
                continue
            try:
                fig = make()
                if name == "intermediate_values":
                    _mark_pruned_plotly(fig, pruned)
                out[name] = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{name}")
            except Exception as exc:  # noqa: BLE001
                logger.info("plot %s not drawn: %s", name, exc)
    return out


def _render_html(study, imp, target_name, pruned, out_dir, result, ev) -> None:
    divs = figures_html(study, imp, target_name, ev, pruned)
    path = os.path.join(out_dir, "study.html")
    with open(path, "w") as f:
        f.write(page(f"Study {study.study_name}", divs))
    result["html"] = path


def plotly_js() -> str:
    """plotly.js itself (inlined into pages, so they work without a network)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def page(title: str, divs: dict[str, str]) -> str:
    import html

    body = "\n".join(f"<h2>{html.escape(k.replace('_', ' '))}</h2>\n{v}" for k, v in divs.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<script>{plotly_js()}</script></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>")


