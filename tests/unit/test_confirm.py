"""The confirmation stage without a cluster: its statistics (Welch's t interval), its summary (best chosen
on validation, never test), its plan, its searcher (each run once, restorable), the StudySpec rules of
``confirm`` and ``objective.selection``, and the selection rule in the Optuna searcher."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from service.core.spec import StudySpec
from service.sweep.confirm_stats import mean_std, summarize, t_quantile, welch_interval

optuna = pytest.importorskip("optuna")
pytest.importorskip("ray.tune")


# -- statistics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("df,expected", [(1, 12.706204736), (2, 4.302652730), (2.5, 3.574654842),
                                         (4, 2.776445105), (10, 2.228138852), (100, 1.983971519)])
def test_t_quantile_matches_tables(df, expected):  # values: scipy.stats.t.ppf(0.975, df)
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-8)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-8)


def test_welch_interval_matches_scipy():
    a, b = [0.91, 0.93, 0.92], [0.88, 0.90, 0.885]
    r = welch_interval(a, b)  # scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert r["diff"] == pytest.approx(0.0316666667)
    assert r["low"] == pytest.approx(0.008515017145, abs=1e-9) and r["high"] == pytest.approx(0.054818316188, abs=1e-9)
    assert r["df"] == pytest.approx(3.99361022, abs=1e-6)


def test_welch_edge_cases():
    assert mean_std([]) == (None, None) and mean_std([0.5]) == (0.5, None)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    one = welch_interval([0.9], [0.8, 0.82])
    assert one["diff"] == pytest.approx(0.09) and one["low"] is None  # one run: no interval
    same = welch_interval([0.9, 0.9], [0.8, 0.8])
    assert same["low"] == same["high"] == pytest.approx(0.1)  # identical runs: the point itself
    assert welch_interval([], [0.8])["diff"] is None


def _plan():
    return {"configs": [
        {"label": "trial #3", "role": "candidate", "trial": 3, "params": {"lam": 1e-3}, "search_value": 0.95},
        {"label": "trial #5", "role": "candidate", "trial": 5, "params": {"lam": 1e-2}, "search_value": 0.94},
        {"label": "reference", "role": "reference", "trial": None, "params": {"lam": 1e-4}, "search_value": None},
    ], "seeds": [1, 2], "epochs": 4, "experiment": "s-confirm"}


def test_summary_best_is_chosen_on_val_never_test():
    runs = {
        "trial #3/seed1": {"label": "trial #3", "seed": 1, "val_acc": 0.90, "test_acc": 0.99},
        "trial #3/seed2": {"label": "trial #3", "seed": 2, "val_acc": 0.90, "test_acc": 0.99},
        "trial #5/seed1": {"label": "trial #5", "seed": 1, "val_acc": 0.95, "test_acc": 0.80},
        "trial #5/seed2": {"label": "trial #5", "seed": 2, "val_acc": 0.93, "test_acc": 0.82},
        "reference/seed1": {"label": "reference", "seed": 1, "val_acc": 0.85, "test_acc": 0.84},
        "reference/seed2": {"label": "reference", "seed": 2, "val_acc": 0.87, "test_acc": 0.86},
    }
    s = summarize(_plan(), runs)
    assert s["status"] == "complete" and s["runs_done"] == s["runs_total"] == 6
    assert s["best"] == "trial #5"  # higher mean val_acc, although trial #3 has the higher test_acc
    d = s["difference"]
    assert d["metric"] == "test_acc" and d["diff"] == pytest.approx(0.81 - 0.85)
    assert d["low"] < d["diff"] < d["high"] and "Welch" in d["method"]
    c5 = s["configurations"][1]
    assert [r["seed"] for r in c5["runs"]] == [1, 2] and c5["val_acc"]["mean"] == pytest.approx(0.94)
    assert c5["val_acc"]["std"] == pytest.approx(math.sqrt(2) * 0.01) and c5["test_acc"]["n"] == 2


def test_summary_partial_and_best_is_reference():
    plan = _plan()
    s = summarize(plan, {"trial #3/seed1": {"label": "trial #3", "seed": 1, "val_acc": 0.9, "test_acc": 0.9}})
    assert s["status"] == "running" and s["runs_done"] == 1 and s["difference"]["diff"] is None  # no reference run yet
    plan["configs"] = [{**plan["configs"][0], "role": "candidate+reference"}]
    runs = {"trial #3/seed1": {"label": "trial #3", "seed": 1, "val_acc": 0.9, "test_acc": 0.9}}
    s = summarize(plan, runs)
    assert s["best"] == s["reference"] == "trial #3" and s["difference"]["diff"] == 0.0


# -- the StudySpec ---------------------------------------------------------------------------------


def spec(**kw):
    return StudySpec.model_validate({"name": "t", "search_space": "digits-smoke", **kw})


def test_confirm_is_off_by_default_and_on_with_defaults():
    assert spec().confirm is None
    c = spec(confirm={}).confirm
    assert (c.seeds, c.top_k, c.epochs, c.reference) == (3, 1, None, True)
    assert spec().objective.selection == "last"
    assert spec(objective={"selection": "best"}).objective.selection == "best"


@pytest.mark.parametrize("kw,loc", [
    ({"confirm": {"seeds": 0}}, ("confirm", "seeds")),
    ({"confirm": {"top_k": 0}}, ("confirm", "top_k")),
    ({"confirm": {"epochs": 0}}, ("confirm", "epochs")),
    ({"confirm": {"seeds": "3"}}, ("confirm", "seeds")),
    ({"confirm": {"sedes": 3}}, ("confirm", "sedes")),
    ({"confirm": {"top_k": 5}, "budget": {"num_trials": 4}}, ("confirm", "top_k")),
    ({"objective": {"selection": "first"}}, ("objective", "selection")),
    ({"objective": {"metric": "val_acc", "selection": "best", "also": [{"metric": "epoch_time_s", "mode": "min"}]},
      "scheduler": {"type": "fifo"}}, ("objective", "selection")),
])
def test_confirm_and_selection_rules(kw, loc):
    with pytest.raises(ValidationError) as ei:
        spec(**kw)
    assert tuple(ei.value.errors()[0]["loc"]) == loc


# -- the plan and the searcher ---------------------------------------------------------------------


def payload(tmp_path, **kw):
    from service.core.payload import JobPayload

    s = spec(base={"seed": 7}, budget={"num_trials": 4}, **kw)
    return JobPayload.build(study_id="sid", spec=s, num_trials=4, mlflow_tracking_uri="file:///x",
                            experiment_id=None, parent_run_id=None, optuna_storage="sqlite://",
                            tune_storage=str(tmp_path), resume=False)


def test_plan_top_k_reference_seeds_and_entries(tmp_path):
    from service.sweep.confirm import make_plan, plan_entries

    p = payload(tmp_path, confirm={"top_k": 2, "seeds": 2, "epochs": 5})
    study = optuna.create_study(direction="maximize")
    d = optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True)
    dist = {"lam": d, "theta": d, "nu": d}
    ref = {"lam": 1e-4, "theta": 1e-3, "nu": 1e-4}
    for v, params, state in [(0.80, ref, "COMPLETE"), (0.90, {"lam": 1e-3, "theta": 1e-3, "nu": 1e-3}, "COMPLETE"),
                             (0.99, {"lam": 1e-2, "theta": 1e-3, "nu": 1e-3}, "PRUNED"),
                             (0.85, {"lam": 1e-5, "theta": 1e-3, "nu": 1e-3}, "COMPLETE")]:
        st = getattr(optuna.trial.TrialState, state)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, state=st,
                                                  value=v if state == "COMPLETE" else None,
                                                  intermediate_values={1: v} if state == "PRUNED" else None))
    plan = make_plan(p, study)
    assert [c["label"] for c in plan["configs"]] == ["trial #1", "trial #3", "reference"]  # pruned never
    assert plan["seeds"] == [8, 9] and plan["epochs"] == 5
    entries = plan_entries(p, plan)
    assert len(entries) == 6 and entries[0]["key"] == "trial #1/seed8"
    cfg = entries[-1]["config"]
    assert cfg["lam"] == 1e-4 and cfg["seed"] == 9 and cfg["epochs"] == 5 and cfg["model"] == "small_cnn"
    # the paper's point among the top k: confirmed once, as both
    p1 = payload(tmp_path, confirm={"top_k": 4, "seeds": 1})
    roles = {c["label"]: c["role"] for c in make_plan(p1, study)["configs"]}
    assert roles == {"trial #1": "candidate", "trial #3": "candidate", "trial #0": "candidate+reference"}


def test_plan_of_a_multi_objective_study_ranks_by_the_primary_objective(tmp_path):
    """objective.also + confirm: candidates by values[0] (a multi-objective trial has no ``value``)."""
    from service.sweep.confirm import make_plan

    p = payload(tmp_path, confirm={"top_k": 1, "seeds": 1}, scheduler={"type": "fifo"},
                objective={"metric": "val_acc", "mode": "max", "also": [{"metric": "epoch_time_s", "mode": "min"}]})
    study = optuna.create_study(directions=["maximize", "minimize"])
    d = optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True)
    dist = {"lam": d, "theta": d, "nu": d}
    for values, lam in [([0.80, 1.0], 1e-4), ([0.90, 3.0], 1e-3), ([0.85, 0.5], 1e-5)]:
        study.add_trial(optuna.trial.create_trial(params={"lam": lam, "theta": 1e-3, "nu": 1e-4},
                                                  distributions=dist, values=values))
    plan = make_plan(p, study)
    assert plan["configs"][0]["label"] == "trial #1" and plan["configs"][0]["search_value"] == 0.90


def test_confirm_searcher_hands_out_each_run_once(tmp_path):
    from ray.tune.search import Searcher

    from service.sweep.confirm import ConfirmSearcher

    entries = [{"key": f"c/seed{s}", "label": "c", "seed": s, "config": {"seed": s}} for s in (1, 2, 3)]
    s = ConfirmSearcher(entries, done={"c/seed2"})
    assert s.suggest("t1") == {"seed": 1}
    assert s.suggest("t1") == {"seed": 1}  # asked again (a restored trial): the same run
    assert s.suggest("t2") == {"seed": 3}
    assert s.suggest("t3") == Searcher.FINISHED  # seed2 was recorded before: never again
    path = tmp_path / "state"
    s.save(str(path))
    s2 = ConfirmSearcher(entries, done=set())
    s2.restore(str(path))
    assert s2.entry("t2")["seed"] == 3 and s2.suggest("t4") == {"seed": 2}


def test_searcher_selection_best_tells_the_best_epoch(tmp_path):
    from service.sweep.searcher import StudyOptunaSearch

    def space(trial):
        trial.suggest_float("lam", 1e-6, 1e-2, log=True)

    for selection, expected in (("last", 0.7), ("best", 0.8)):
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/{selection}.db")
        s = StudyOptunaSearch(space, metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                              storage=storage, study_name="s", default_epochs=3, selection=selection)
        s.suggest("t")
        for e, v in ((1, 0.5), (2, 0.8), (3, 0.7)):
            s.on_trial_result("t", {"val_acc": v, "epoch": e, "training_iteration": e})
        s.on_trial_complete("t", {"val_acc": 0.7, "epoch": 3, "training_iteration": 3})
        assert s.study.trials[0].value == pytest.approx(expected)


def test_record_run_writes_each_run_once_and_the_summary():
    from service.sweep.confirm import RUNS_ATTR, SUMMARY_ATTR, record_run

    study = optuna.create_study(direction="maximize")
    plan = _plan()
    run = {"label": "trial #3", "seed": 1, "val_acc": 0.9, "test_acc": 0.91}
    assert record_run(study, "trial #3/seed1", run, plan) is True
    assert record_run(study, "trial #3/seed1", {**run, "val_acc": 0.1}, plan) is False  # never twice
    assert study.user_attrs[RUNS_ATTR]["trial #3/seed1"]["val_acc"] == 0.9
    s = study.user_attrs[SUMMARY_ATTR]
    assert s["runs_done"] == 1 and s["status"] == "running"
    assert summarize(plan, study.user_attrs[RUNS_ATTR], final=True)["status"] == "incomplete"


def test_registered_run_has_what_register_best_reads():
    """register_best reads ``number``, ``values[0]`` and ``user_attrs`` of what it registers."""
    from service.sweep.confirm import RUNS_ATTR, registered_run

    study = optuna.create_study(direction="maximize")
    study.set_user_attr(RUNS_ATTR, {
        "trial #1/seed1": {"label": "trial #1", "seed": 1, "val_acc": 0.9, "test_acc": 0.88, "mlflow_run_id": "a"},
        "trial #1/seed2": {"label": "trial #1", "seed": 2, "val_acc": 0.95, "test_acc": 0.91, "mlflow_run_id": "b"},
        "reference/seed1": {"label": "reference", "seed": 1, "val_acc": 0.99, "test_acc": 0.5, "mlflow_run_id": "c"},
    })
    run = registered_run({"best": "trial #1", "experiment": "x-confirm"}, study)
    assert run.number == "confirm:trial #1/seed2" and run.values[0] == run.value == 0.95
    assert run.user_attrs["mlflow_run_id"] == "b" and run.user_attrs["test_acc"] == 0.91
