"""service.core.study_plots on an in-memory Optuna study: every plot drawn, pruned trials marked."""

from __future__ import annotations

import json
import math

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("plotly")
pytest.importorskip("sklearn")

from service.core import study_plots  # noqa: E402


def make_study(n: int = 8, params=("lam", "theta", "nu")):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0),
                                study_name="plots-unit")
    for i in range(n):
        t = study.ask()
        x = {p: t.suggest_float(p, 1e-5, 1e-1, log=True) for p in params}
        curve = [0.5 + 0.1 * e - abs(math.log10(x[params[0]]) + 3) * 0.02 for e in range(1, 4)]
        steps = 3 if i % 3 else 1
        for e in range(steps):
            t.report(curve[e], e + 1)
        if steps == 3:
            study.tell(t, curve[-1])
        else:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
    return study


def test_render_draws_every_plot_png_and_html(tmp_path):
    study = make_study()
    res = study_plots.render(study, str(tmp_path), "val_acc")
    assert res["plots"] == list(study_plots.PLOTS), res["skipped"]
    for name in study_plots.PLOTS:
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "study.html").read_text()
    assert "plot-contour" in html and "pruned (ASHA)" in html and "Plotly" in html
    imp = json.loads((tmp_path / "importances.json").read_text())["importances"]
    assert set(imp) == {"lam", "theta", "nu"} and imp == res["importances"]
    assert max(imp, key=imp.get) == "lam"  # the curves depend on lam only


def test_contour_falls_back_to_the_most_important_pair_and_too_few_trials(tmp_path):
    study = make_study(params=("nu", "lr"))
    assert study_plots.contour_params(study, {"lr": 0.7, "nu": 0.3}) == ["lr", "nu"]
    assert study_plots.contour_params(make_study(params=("lam",)), {"lam": 1.0}) is None
    few = make_study(n=1)
    res = study_plots.render(few, str(tmp_path))
    assert res["plots"] == [] and "fewer than two" in res["skipped"]["slice"]


def test_multi_objective_study_gets_a_pareto_front_plot(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("objective_names", ["val_acc", "epoch_time_s"])
    for _ in range(6):
        t = study.ask()
        lam, theta = t.suggest_float("lam", 1e-5, 1e-1, log=True), t.suggest_float("theta", 1e-5, 1e-1, log=True)
        study.tell(t, [0.9 - abs(math.log10(lam) + 3) * 0.05, 1.0 + theta * 10])
    res = study_plots.render(study, str(tmp_path), "val_acc")
    assert "pareto_front" in res["plots"] and "intermediate_values" not in res["plots"], res["skipped"]
    assert (tmp_path / "pareto_front.png").exists() and set(res["importances"]) == {"lam", "theta"}


def test_a_drawing_reads_the_storage_once_and_fits_fanova_once(tmp_path):
    """The driver's refresh (every few trials) must not query the study per plot nor refit fANOVA per plot."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    src = make_study()
    study = optuna.create_study(direction="maximize", storage=storage, study_name="plots-db")
    study.add_trials(src.get_trials())
    running = study.ask()  # a trial still running, with a learning curve so far
    running.report(0.4, 1)
    study.set_user_attr("objective_names", ["val_acc"])
    calls = {"n": 0}
    real = study._storage.get_all_trials  # what Study.get_trials reads (Optuna's cache over the RDB)

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    study._storage.get_all_trials = counting
    res = study_plots.render(study, str(tmp_path / "out"), "val_acc")
    assert res["plots"] == list(study_plots.PLOTS), res["skipped"]
    assert calls["n"] == 1, f"{calls['n']} reads of the storage for one drawing"
    assert res["fanova_fits"] == 1
    snap = study_plots.snapshot(study)
    assert [t.state for t in snap.trials] == [t.state for t in study.trials]
    assert snap.trials[-1].intermediate_values == {1: 0.4} and snap.user_attrs == study.user_attrs
    # the same importances as a fresh fit
    assert res["importances"] == pytest.approx(study_plots.importances(study))
