"""The study report: one self-contained HTML page, and the same data as JSON, for a paper or a PR.

:func:`build_report` gathers what the API already knows of a study -- its public view (status, spec,
objective, links to MLflow, Ray and optuna-dashboard, trial counts, best trial), its trials, and the
Optuna study itself -- into one dict: the spec, the table of trials, the best trial next to the
paper's warm-start point (the space's first ``warm_start`` point, and the trial that evaluated it),
the fANOVA importances, the Pareto front of a multi-objective study, and ``confirmation``: the
result of a confirmation stage when the study has one (``None`` until then; the report shows it as
given, a dict of name -> value). :func:`render_html` makes the page: plots from
``service.core.study_plots`` (plotly, plotly.js inlined once: the page needs no network), tables and
links. The API serves both (``GET /studies/{id}/report``, ``?format=html``); the CLI writes both
(``bonn-sweep studies report ID --out DIR``). Nothing here imports ray; optuna and plotly lazily.
"""

from __future__ import annotations

import html
import json
import math
from datetime import UTC, datetime
from typing import Any

REPORT_VERSION = 1


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def warm_start_trial(trials: list[dict[str, Any]], point: dict[str, Any]) -> dict[str, Any] | None:
    """The first trial whose params equal the warm-start point (on the point's keys)."""
    for t in sorted(trials, key=lambda t: t.get("number", 0)):
        params = t.get("params") or {}
        if point and all(k in params and _close(params[k], v) for k, v in point.items()):
            return t
    return None


def build_report(study: dict[str, Any], trials: list[dict[str, Any]], optuna_study: Any = None, *,
                 warm_start: list[dict[str, Any]] | None = None, confirmation: dict[str, Any] | None = None,
                 with_plots: bool = True) -> dict[str, Any]:
    """The report's data. ``study`` is the API's study view (``StudyPublic`` as JSON), ``trials`` its
    trials (``TrialPublic`` as JSON). With ``with_plots`` the HTML fragments of the plots are under
    ``plots_html`` (not part of the JSON answer: :func:`report_json`)."""
    objective = dict(study.get("objective") or {})
    point = (warm_start or [None])[0]
    warm_trial = warm_start_trial(trials, point) if point else None
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "study": {k: study.get(k) for k in ("id", "name", "status", "created_at", "started_at", "finished_at",
                                             "num_trials", "error", "registered_model", "mlflow_experiment_id",
                                             "mlflow_parent_run_id", "submission_id")},
        "objective": objective,
        "spec": study.get("spec"),
        "links": study.get("links") or {},
        "trial_counts": study.get("trial_counts") or {},
        "best_trial": study.get("best_trial"),
        "warm_start": {"params": point, "trial": _trial_brief(warm_trial)} if point else None,
        "confirmation": confirmation,  # filled by the confirmation stage when the study has one
        "importances": {},
        "pareto_front": study.get("pareto_front"),
        "trials": trials,
        "plots": [],
    }
    if optuna_study is not None:
        from service.core import study_plots

        target = str(objective.get("metric") or "objective")
        try:
            snap = study_plots.snapshot(optuna_study)  # one read of the storage, one fANOVA fit
            ev = study_plots.fanova_once()
            imp = study_plots.importances(snap, ev)
            report["importances"] = imp
            divs = study_plots.figures_html(snap, imp, target, ev) if with_plots else {}
        except Exception as exc:  # noqa: BLE001 - a report without plots beats no report
            divs = {}
            report["plots_error"] = f"{type(exc).__name__}: {exc}"
        if with_plots:
            report["plots"] = list(divs)
            report["plots_html"] = divs
    return report


def _trial_brief(t: dict[str, Any] | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {k: t.get(k) for k in ("number", "state", "value", "best_value", "best_epoch", "epochs_done",
                                  "mlflow_run_id", "params")}


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report as JSON data: everything but the plots' HTML."""
    return {k: v for k, v in report.items() if k != "plots_html"}


# -- HTML ------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;
margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;font-size:.9em}th{background:#f4f4f4}
td.l,th.l{text-align:left}pre{background:#f8f8f8;padding:1em;overflow:auto;font-size:.85em}.muted{color:#777}"""


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], left: int = 1, cls: str = "") -> str:
    head = "".join(f"<th class='{'l' if i < left else ''}'>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{_fmt(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _links(links: dict[str, Any]) -> str:
    items = [f"<li>{html.escape(k.replace('_', ' '))}: <a href='{html.escape(str(v))}'>{html.escape(str(v))}</a></li>"
             for k, v in links.items() if v]
    return "<ul>" + "".join(items) + "</ul>" if items else "<p class='muted'>none</p>"


def _best_vs_warm(report: dict[str, Any]) -> str:
    best, warm = report.get("best_trial"), report.get("warm_start")
    if not best and not warm:
        return "<p class='muted'>no completed trial yet</p>"
    wt = (warm or {}).get("trial") or {}
    wparams = (warm or {}).get("params") or {}
    bparams = (best or {}).get("params") or {}
    metric = report["objective"].get("metric", "objective")
    rows = [[f"{metric} ({report['objective'].get('mode', '')})", (best or {}).get("value"), wt.get("value")],
            ["trial", (best or {}).get("number"), wt.get("number")],
            ["epoch", (best or {}).get("epoch"), wt.get("best_epoch")]]
    rows += [[k, bparams.get(k), wparams.get(k)] for k in sorted(set(bparams) | set(wparams))]
    return _table(["", "best trial", "paper's warm-start point"], rows)


def _mean_std(stat: dict[str, Any] | None) -> str:
    stat = stat or {}
    if stat.get("mean") is None:
        return "-"
    std = stat.get("std")
    return f"{stat['mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" (n={stat.get('n', 0)})"


def _confirmation(conf: dict[str, Any] | None) -> str:
    """The confirmation stage (``GET /studies/{id}``'s ``confirmation``): each configuration over its seeds,
    then best - reference on the test split with its interval."""
    if not conf:
        return "<p class='muted'>no confirmation run for this study</p>"
    rows = [[c.get("label"), c.get("role"), c.get("search_value"), _mean_std(c.get("val_acc")),
             _mean_std(c.get("test_acc")), ", ".join(_fmt(r.get("test_acc")) for r in c.get("runs") or [])]
            for c in conf.get("configurations") or []]
    out = [f"<p>status <b>{_fmt(conf.get('status'))}</b>, {_fmt(conf.get('runs_done'))} of "
           f"{_fmt(conf.get('runs_total'))} runs, seeds {_fmt(conf.get('seeds'))}, best (on validation) "
           f"<b>{_fmt(conf.get('best'))}</b>, reference <b>{_fmt(conf.get('reference'))}</b></p>",
           _table(["configuration", "role", "search value", "val acc", "test acc", "test acc per seed"], rows,
                  left=2)]
    for key in ("difference", "difference_val"):
        d = conf.get(key)
        if d and d.get("diff") is not None:
            interval = (f" [{d['low']:+.4f}, {d['high']:+.4f}] ({int(d.get('level', 0.95) * 100)}%, {d.get('method')})"
                        if d.get("low") is not None else "")
            out.append(f"<p>best - reference on {_fmt(d.get('metric'))}: <b>{d['diff']:+.4f}</b>{interval}</p>")
    return "".join(out)


def _trials_table(report: dict[str, Any]) -> str:
    trials = report.get("trials") or []
    names = sorted({k for t in trials for k in (t.get("params") or {})})
    header = ["#", "state", "value", "best", "best epoch", "epochs", "stop reason", *names]
    rows = [[t.get("number"), t.get("state"), t.get("value"), t.get("best_value"), t.get("best_epoch"),
             t.get("epochs_done"), t.get("stop_reason"), *[(t.get("params") or {}).get(n) for n in names]]
            for t in trials]
    return _table(header, rows, left=2, cls="trials")


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page (plotly.js inlined when there are plots)."""
    s = report["study"]
    title = f"bonn-sweep study {s.get('name')} ({s.get('id')})"
    plots = report.get("plots_html") or {}
    script = ""
    if plots:
        from service.core.study_plots import plotly_js

        script = f"<script>{plotly_js()}</script>"
    imp = report.get("importances") or {}
    pareto = report.get("pareto_front")
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>status <b>{_fmt(s.get('status'))}</b>, objective <b>{_fmt(report['objective'].get('metric'))}</b> "
        f"({_fmt(report['objective'].get('mode'))}); trials "
        + html.escape(", ".join(f"{k} {v}" for k, v in (report.get("trial_counts") or {}).items()) or "-") + "; "
        f"registered model {_fmt(s.get('registered_model'))}; generated {_fmt(report.get('generated_at'))}</p>",
        "<h2>Links</h2>", _links(report.get("links") or {}),
        "<h2>Best trial and the paper's warm-start point</h2>", _best_vs_warm(report),
        "<h2>Confirmation</h2>", _confirmation(report.get("confirmation")),
    ]
    if pareto:
        parts += ["<h2>Pareto front</h2>", _table(["#", "values", "params"],
                                                 [[p.get("number"), p.get("values"), p.get("params")] for p in pareto])]
    if imp:
        parts += ["<h2>Parameter importances (fANOVA)</h2>", _table(["parameter", "importance"], list(imp.items()))]
    parts += ["<h2>Plots</h2>"]
    parts += [f"<h3>{html.escape(k.replace('_', ' '))}</h3>\n{v}" for k, v in plots.items()] or [
        "<p class='muted'>no plots (fewer than two finished trials)</p>"]
    parts += ["<h2>Trials</h2>", _trials_table(report),
              "<h2>Spec</h2>", f"<pre>{html.escape(json.dumps(report.get('spec'), indent=2))}</pre>",
              f"<script type='application/json' id='report-data'>"
              f"{json.dumps(report_json(report), default=str).replace('</', '<' + chr(92) + '/')}</script>"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style>{script}</head><body>\n" + "\n".join(parts) + "\n</body></html>")
