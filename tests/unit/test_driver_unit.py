"""Study driver pieces without a cluster: PRUNED logic against a real Optuna SQLite storage, searcher
save/restore and orphans, num_trials extension on restore, the monitor's limits, the payload."""

from __future__ import annotations

import json
import math
import pickle
import time
from types import SimpleNamespace

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("ray.tune")

from optuna.trial import TrialState  # noqa: E402

from service.core import jobs  # noqa: E402
from service.core.payload import PAYLOAD_ENV, JobPayload, PayloadError  # noqa: E402
from service.sweep import driver  # noqa: E402
from service.sweep.monitor import StudyMonitor  # noqa: E402
from service.sweep.registry import registered_model_name  # noqa: E402
from service.sweep.samplers import build_sampler, grid_size  # noqa: E402
from service.sweep.searcher import (  # noqa: E402
    DefineByRun,
    StudyConcurrencyLimiter,
    StudyOptunaSearch,
    StudySearchGenerator,
    fail_running_trials,
)
from service.sweep.stop_reasons import classify_stop, target_epochs  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_fn(trial):
    trial.suggest_float("lam", 1e-6, 1e-2, log=True)
    trial.suggest_float("theta", 1e-5, 1e-1, log=True)
    return {"model": "small_cnn"}


@pytest.fixture()
def storage_url(tmp_path):
    return f"sqlite:///{tmp_path}/optuna.db"


def make_searcher(url, study="s1", epochs=4, max_t=None, points=None, sampler=None, mode="max"):
    return StudyOptunaSearch(
        space_fn, metric="val_acc", mode=mode, sampler=sampler or optuna.samplers.TPESampler(seed=0),
        storage=optuna.storages.RDBStorage(url), study_name=study, points_to_evaluate=points,
        default_epochs=epochs, max_t=max_t,
    )


def res(epoch, v):
    return {"epoch": epoch, "training_iteration": epoch, "val_acc": v}


def feed(s, tid, values, complete=True, error=False):
    """Tune's call order: on_trial_result for every result but the one the scheduler stops on."""
    for i, v in enumerate(values[:-1], start=1):
        s.on_trial_result(tid, res(i, v))
    if complete:
        s.on_trial_complete(tid, result=res(len(values), values[-1]) if values else None, error=error)


def frozen(s, tid):
    return s.study._storage.get_trial(s.optuna_trial(tid)._trial_id)


def test_helpers():
    assert target_epochs(10, 5, None) == 10 and target_epochs(None, 5, None) == 5 and target_epochs(10, 5, 3) == 3
    assert classify_stop(2, 4) == "early_stopped" and classify_stop(4, 4) == "completed"
    assert classify_stop(4, 4, error=True) == "error"
    assert grid_size({"a": [1, 2], "b": [1, 2, 3]}) == 6
    assert registered_model_name("digits smoke") == "bonn-sweep-digits-smoke"


def test_pruned_complete_fail(storage_url):
    s = make_searcher(storage_url, epochs=4)
    for tid in ("t1", "t2", "t3", "t4", "t5"):
        params = s.suggest(tid)
        assert {"lam", "theta", "model"} <= set(params)
    feed(s, "t1", [0.3, 0.5])                      # ASHA stopped it after 2 of 4 epochs
    feed(s, "t2", [0.3, 0.5, 0.6, 0.7])            # ran its 4 epochs
    feed(s, "t3", [0.2], error=True)               # errored
    feed(s, "t4", [0.4, float("nan")])             # NaN objective
    s.on_trial_complete("t5", result=None)         # removed before its first result

    f1 = frozen(s, "t1")
    assert f1.state == TrialState.PRUNED
    assert f1.value == 0.5 and f1.intermediate_values == {1: 0.3, 2: 0.5}
    assert f1.user_attrs["stop_reason"] == "early_stopped" and f1.user_attrs["epochs_done"] == 2
    assert f1.user_attrs["tune_trial_id"] == "t1"
    f2 = frozen(s, "t2")
    assert f2.state == TrialState.COMPLETE and f2.value == 0.7 and f2.user_attrs["stop_reason"] == "completed"
    f3 = frozen(s, "t3")
    assert f3.state == TrialState.FAIL and f3.user_attrs["stop_reason"] == "error"
    assert frozen(s, "t4").state == TrialState.FAIL
    f5 = frozen(s, "t5")
    assert f5.state == TrialState.FAIL and f5.user_attrs["stop_reason"] == "cancelled"
    assert s.study.best_trial.number == f2.number  # pruned trials never become "best"


def test_max_t_caps_completion_and_epochs_param(storage_url):
    s = make_searcher(storage_url, epochs=10, max_t=3)
    s.suggest("a")
    feed(s, "a", [0.1, 0.2, 0.3])  # ASHA stops every trial at max_t=3: that is completion
    assert frozen(s, "a").state == TrialState.COMPLETE


def test_user_attrs_only_while_running(storage_url):
    s = make_searcher(storage_url)
    s.suggest("a")
    assert s.set_trial_attrs("a", {"mlflow_run_id": "r1", "checkpoint_uri": "x"})
    feed(s, "a", [0.1, 0.2, 0.3, 0.4])
    assert not s.set_trial_attrs("a", {"mlflow_run_id": "r2"})  # finished: no-op, no exception
    assert frozen(s, "a").user_attrs["mlflow_run_id"] == "r1"
    assert not s.set_trial_attrs("unknown", {"x": 1})


def test_warm_start_enqueued_once(storage_url):
    pts = [{"lam": 1e-4, "theta": 1e-3}]
    s = make_searcher(storage_url, points=pts)
    p = s.suggest("a")
    assert p["lam"] == pytest.approx(1e-4) and p["theta"] == pytest.approx(1e-3)
    feed(s, "a", [0.1, 0.2, 0.3, 0.4])
    s2 = make_searcher(storage_url, points=pts)  # a restarted driver builds the searcher again
    assert s2.study._storage.get_all_trials(s2.study._study_id, states=(TrialState.WAITING,)) == []
    assert s2.suggest("b")["lam"] != pytest.approx(1e-4)


def test_save_restore_rebinds_and_fails_orphans(storage_url, tmp_path):
    s = make_searcher(storage_url)
    for tid in ("a", "b", "c"):
        s.suggest(tid)
    feed(s, "a", [0.1, 0.2, 0.3, 0.4])
    feed(s, "b", [0.2, 0.3], complete=False)  # still running when the driver stops (epoch 1 reported)
    ckpt = tmp_path / "searcher.pkl"
    s.save(str(ckpt))
    # after the save, the driver asked for one more trial and crashed before Tune saved it
    orphan = s.study.ask()
    # ... and "c" finished in Optuna? no: it stays running too (it is in the saved map)

    s2 = make_searcher(storage_url)  # fresh object as Tuner.restore() builds it
    s2.restore(str(ckpt))
    assert set(s2._ot_trials) == {"a", "b", "c"}
    assert "a" in s2._completed_trials
    states = {t.number: t.state for t in s2.study.get_trials()}
    assert states[orphan.number] == TrialState.FAIL
    assert states[frozen(s2, "b").number] == TrialState.RUNNING  # Tune resumes it: keep it
    assert states[frozen(s2, "c").number] == TrialState.RUNNING
    # the restored searcher goes on with the same Optuna trials
    s2.on_trial_result("b", res(2, 0.5))
    s2.on_trial_complete("b", result=res(4, 0.6))
    fb = frozen(s2, "b")
    assert fb.state == TrialState.COMPLETE and fb.value == 0.6 and fb.intermediate_values[1] == 0.2
    # the storage object is the live one, not the unpickled copy
    assert s2._storage is not None and s2.study._storage._backend is s2._storage


def test_restore_counts_trials_that_finished_after_the_saved_state(storage_url, tmp_path):
    """A driver killed with SIGKILL saves nothing at the end: trials created after the last saved
    state either finished (kept, and counted as created so that the generator does not replace
    them) or were cut off (FAIL, stop_reason=cancelled, replaced)."""
    s = make_searcher(storage_url)
    for tid in ("a", "b"):
        s.suggest(tid)
    feed(s, "a", [0.1, 0.2])
    ckpt = tmp_path / "searcher.pkl"
    s.save(str(ckpt))
    saved_generator = {"counter": 2, "total_samples": 5, "finished": False, "experiment": None}
    for tid in ("c", "d", "e"):  # after the save: "c" completes, "d" errors, "e" is cut off by the kill
        s.suggest(tid)
    feed(s, "c", [0.3, 0.4])
    feed(s, "d", [0.1], error=True)
    s.on_trial_result("e", res(1, 0.2))

    s2 = make_searcher(storage_url)
    s2.restore(str(ckpt))
    assert s2.finished_unknown == 2 and s2.trials_accounted == 4
    cut = s2.study._storage.get_trial(s._ot_trials["e"]._trial_id)
    assert cut.state == TrialState.FAIL and cut.user_attrs["stop_reason"] == "cancelled"
    gen = StudySearchGenerator(StudyConcurrencyLimiter(s2, max_concurrent=2), num_trials=5)
    gen.set_state(dict(saved_generator))
    assert gen.created == 4 and not gen.is_finished()  # one more trial, in place of "e"

    # the next restore (state saved by the resumed run, which never knew c, d, e) counts nothing twice
    s2.save(str(ckpt))
    s3 = make_searcher(storage_url)
    s3.restore(str(ckpt))
    assert s3.finished_unknown == 2
    gen3 = StudySearchGenerator(StudyConcurrencyLimiter(s3, max_concurrent=2), num_trials=5)
    gen3.set_state({**saved_generator, "counter": 4})
    assert gen3.created == 4


def test_errored_trial_gets_its_reason_as_user_attr(storage_url):
    s = make_searcher(storage_url)
    s.error_reason = {"a": "TrainingDiverged: non-finite training loss in epoch 1"}.get
    s.suggest("a")
    s.suggest("b")
    feed(s, "a", [0.1], error=True)
    feed(s, "b", [0.1, 0.3])
    assert frozen(s, "a").user_attrs["error"] == "TrainingDiverged: non-finite training loss in epoch 1"
    assert "error" not in frozen(s, "b").user_attrs


class Space:  # stands in for search_spaces.SearchSpace (module level: picklable)
    def define_by_run(self, trial):
        trial.suggest_float("lam", 0.1, 1.0)
        return {"epochs": 3, "model": "small_cnn"}


def test_searcher_state_pickles_with_define_by_run_wrapper(storage_url, tmp_path):
    s = StudyOptunaSearch(
        DefineByRun(Space(), drop_keys={"epochs"}), metric="val_acc", mode="max",
        sampler=optuna.samplers.RandomSampler(seed=1), storage=optuna.storages.RDBStorage(storage_url),
        study_name="dbr",
    )
    p = s.suggest("x")
    assert "epochs" not in p and p["model"] == "small_cnn"  # base's epochs wins over the space's fixed
    s.save(str(tmp_path / "s.pkl"))
    import ray.cloudpickle

    ray.cloudpickle.dumps(s)  # tuner.pkl


def test_errored_then_resumed_trial_gets_new_optuna_trial(storage_url):
    s = make_searcher(storage_url)
    s.suggest("a")
    feed(s, "a", [0.2], error=True)
    failed = frozen(s, "a")
    assert failed.state == TrialState.FAIL
    # Tuner.restore(resume_errored=True) re-runs "a" from its checkpoint, it then completes
    s.on_trial_complete("a", result=res(4, 0.7))
    trials = s.study.get_trials()
    assert len(trials) == 2
    new = trials[-1]
    assert new.state == TrialState.COMPLETE and new.value == 0.7
    assert new.params == failed.params and new.user_attrs["retry_of"] == failed.number
    assert new.user_attrs["tune_trial_id"] == "a"
    s.on_trial_complete("a", result=res(4, 0.7))  # idempotent
    assert len(s.study.get_trials()) == 2


def test_finalize_and_fail_running(storage_url):
    s = make_searcher(storage_url)
    s.suggest("a")
    s.suggest("b")
    s.on_trial_result("a", res(1, 0.3))
    assert s.finalize("a", res(2, 0.4))
    assert frozen(s, "a").state == TrialState.PRUNED and frozen(s, "a").value == 0.4
    assert fail_running_trials(s.study) == 1
    assert frozen(s, "b").state == TrialState.FAIL


def test_generator_extends_num_trials_on_restore(storage_url):
    s = make_searcher(storage_url)
    gen = StudySearchGenerator(StudyConcurrencyLimiter(s, max_concurrent=2), num_trials=4)
    state = {"counter": 4, "total_samples": 4, "finished": True, "experiment": object()}
    gen.set_state(state)
    assert gen.is_finished()  # 4 of 4: finished stays finished
    gen2 = StudySearchGenerator(StudyConcurrencyLimiter(s, max_concurrent=2), num_trials=6)
    gen2.set_state(dict(state))
    assert gen2.total_samples == 6 and not gen2.is_finished()  # a resume with more trials goes on
    gen3 = StudySearchGenerator(StudyConcurrencyLimiter(s, max_concurrent=2), num_trials=4)
    gen3.set_state({"counter": 2, "total_samples": 4, "finished": True, "experiment": None})
    assert not gen3.is_finished()  # stopped by the failure limit before: the resume goes on
    assert gen3.base_searcher is s


def test_concurrency_limiter_forwards_untracked_completion(storage_url):
    s = make_searcher(storage_url)
    lim = StudyConcurrencyLimiter(s, max_concurrent=1)
    lim.set_search_properties(None, None, {})
    assert lim.suggest("a") is not None
    assert lim.suggest("b") is None  # limit 1
    lim.on_trial_complete("a", result=res(4, 0.5))
    assert frozen(s, "a").state == TrialState.COMPLETE
    s._completed_trials.discard("a")  # pretend: "a" errored, was resumed, untracked by the limiter
    s._ot_trials["z"] = s.study.ask()
    lim.on_trial_complete("z", result=res(4, 0.6))  # not in live_trials: still reaches the searcher
    assert s.study._storage.get_trial(s._ot_trials["z"]._trial_id).state == TrialState.COMPLETE


def test_samplers():
    assert isinstance(build_sampler("tpe", 0), optuna.samplers.TPESampler)
    assert isinstance(build_sampler("gp", 0), optuna.samplers.GPSampler)
    assert isinstance(build_sampler("random", 0), optuna.samplers.RandomSampler)
    assert isinstance(build_sampler("grid", 0, {"a": [1, 2]}), optuna.samplers.GridSampler)
    with pytest.raises(ValueError):
        build_sampler("grid", 0, {})
    try:
        import cmaes  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="cmaes"):
            build_sampler("cmaes", 0)


def test_grid_exhaustion_does_not_leave_running(storage_url):
    s = StudyOptunaSearch(
        lambda t: {"x": t.suggest_categorical("x", [1, 2])} and None, metric="val_acc", mode="max",
        sampler=build_sampler("grid", 0, {"x": [1, 2]}), storage=optuna.storages.RDBStorage(storage_url),
        study_name="g", default_epochs=4,
    )
    for tid in ("a", "b"):
        s.suggest(tid)
        s.on_trial_complete(tid, result=res(4, 0.5))
    assert [t.state for t in s.study.get_trials()] == [TrialState.COMPLETE, TrialState.COMPLETE]


# -- monitor --------------------------------------------------------------------------------------------


def monitor(generator, **kw):
    args = dict(metric="val_acc", num_trials=4, fixed_keys={"epochs"}, max_failed_trials=1, time_budget_s=None,
                default_epochs=10, max_t=3)
    args.update(kw)
    return StudyMonitor(generator=generator, **args)


class Gen:
    def __init__(self):
        self.finished = False
        self.created = 1

    def set_finished(self):
        self.finished = True


def fake_trial(tid):
    return SimpleNamespace(trial_id=tid, config={"epochs": 3, "lam": 0.1}, last_result={"epoch": 3, "val_acc": 0.5},
                           run_metadata=SimpleNamespace(num_failures=2), __str__=lambda self=None: tid)


def test_monitor_failure_limit_and_budget(capsys):
    g = Gen()
    m = monitor(g, max_failed_trials=1)
    m.on_trial_error(iteration=1, trials=[], trial=fake_trial("a"))
    assert not g.finished and not m.failure_limit_hit
    m.on_trial_error(iteration=2, trials=[], trial=fake_trial("b"))
    assert g.finished and m.failure_limit_hit

    g2 = Gen()
    m2 = monitor(g2, time_budget_s=0.05)
    m2.setup()
    m2.on_step_begin(iteration=1, trials=[])
    assert not g2.finished
    time.sleep(0.06)
    m2.on_step_begin(iteration=2, trials=[])
    assert g2.finished and m2.budget_hit
    # elapsed time survives a restore
    m3 = monitor(Gen(), time_budget_s=0.05)
    m3.set_state(pickle.loads(pickle.dumps(m2.get_state())))
    m3.setup()
    assert m3.elapsed() >= 0.06
    out = capsys.readouterr().out
    assert "time budget" in out and "ERROR" in out


def test_monitor_lines(capsys):
    m = monitor(Gen())
    t = fake_trial("x")
    m.on_trial_start(iteration=0, trials=[], trial=t)
    m.on_trial_result(iteration=1, trials=[], trial=t, result={"epoch": 1, "val_acc": 0.25, "epoch_time_s": 0.5})
    m.on_trial_complete(iteration=2, trials=[], trial=t)
    out = capsys.readouterr().out.splitlines()
    assert any("started" in ln and "lam=0.1" in ln for ln in out)
    assert any("epoch 1/3" in ln and "val_acc=0.25" in ln for ln in out)
    assert any("completed after 3 epoch(s)" in ln for ln in out)
    summary = m.timing_summary()
    assert summary["trials_timed"] == 1 and summary["trial_train_mean_s"] == 0.5


# -- payload ----------------------------------------------------------------------------------------------


def test_payload(tmp_path, monkeypatch):
    good = {"study_id": "s", "spec": {"name": "x"}, "mlflow_tracking_uri": "http://m", "experiment_id": 3,
            "parent_run_id": "p", "optuna_storage": "sqlite:///x.db", "tune_storage": "/t", "resume": True,
            "num_trials": 5}
    f = tmp_path / "job.json"
    f.write_text(json.dumps(good))
    p = driver.load_payload(["--job-file", str(f)])
    assert p.study_id == "s" and p.experiment_id == "3" and p.resume and p.num_trials == 5
    monkeypatch.setenv(PAYLOAD_ENV, json.dumps(good))
    assert driver.load_payload([]).parent_run_id == "p"
    with pytest.raises(PayloadError, match="study id"):
        driver.load_payload(["other"])
    bad = dict(good)
    del bad["optuna_storage"]
    monkeypatch.setenv(PAYLOAD_ENV, json.dumps(bad))
    with pytest.raises(PayloadError, match="optuna_storage"):
        driver.load_payload([])
    monkeypatch.setenv(PAYLOAD_ENV, json.dumps({**good, "num_trials": 0}))
    with pytest.raises(PayloadError, match="num_trials"):
        driver.load_payload([])
    monkeypatch.setenv(PAYLOAD_ENV, "{not json")
    assert driver.main([]) == jobs.EXIT_BAD_PAYLOAD
    monkeypatch.delenv(PAYLOAD_ENV)
    assert driver.main([]) == jobs.EXIT_BAD_PAYLOAD


def test_payload_derived_values_digits_smoke():
    pytest.importorskip("search_spaces")
    spec = {"name": "digits smoke", "search_space": "digits-smoke", "base": {"epochs": 2},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "budget": {"num_trials": 4, "max_concurrent_trials": 2}}
    p = JobPayload(study_id="s", spec=spec, mlflow_tracking_uri="http://m", optuna_storage="sqlite:///x.db",
                   tune_storage="/t", num_trials=6)
    base = p.trial_defaults
    assert p.trials_requested == 6 and p.max_t == 2 and base["epochs"] == 2 and base["dataset"] == "digits"
    assert p.target_epochs == 2 and p.study_spec.objective.metric == "val_acc" and p.study_spec.objective.mode == "max"
    space = p.study_spec.space
    assert space.warm_start_points
    # the define-by-run wrapper keeps base on top of the space's fixed values
    study = optuna.create_study(direction="maximize")
    t = study.ask()
    fixed = DefineByRun(space, drop_keys=base.keys())(t) or {}
    assert "epochs" not in fixed and set(t.params) == {"lam", "theta", "nu"}
    assert all(math.isfinite(v) for v in t.params.values())
    pickle.dumps(DefineByRun(space, drop_keys=base.keys()))


def test_invalid_spec_fails_cleanly(monkeypatch, tmp_path, capsys):
    payload = {"study_id": "bad", "spec": {"name": "x", "search_space": "no-such-preset"},
               "mlflow_tracking_uri": f"sqlite:///{tmp_path}/m.db", "optuna_storage": f"sqlite:///{tmp_path}/o.db",
               "tune_storage": str(tmp_path / "tune")}
    monkeypatch.setenv(PAYLOAD_ENV, json.dumps(payload))
    assert driver.main([]) == jobs.EXIT_BAD_PAYLOAD
    assert "invalid spec" in capsys.readouterr().out


def test_job_payload_built_by_the_api_is_what_the_driver_parses():
    pytest.importorskip("search_spaces")
    from service.core.spec import StudySpec
    from service.sweep.tuner import trial_bundles

    spec = StudySpec.model_validate({
        "name": "rt", "search_space": "digits-smoke", "base": {"epochs": 3}, "scheduler": {"type": "fifo"},
        "budget": {"num_trials": 4}, "resources": {"cpus_per_trial": 2, "data_parallel_workers": 2, "custom": {"w": 1}},
    })
    p = JobPayload.build(study_id="s", spec=spec, num_trials=7, mlflow_tracking_uri="http://m", experiment_id="3",
                         parent_run_id=None, optuna_storage="sqlite:///o.db", tune_storage="/t", resume=True)
    q = JobPayload.from_json(p.to_json())
    assert q.model_dump() == p.model_dump()
    assert q.spec["budget"]["num_trials"] == 7 and q.trials_requested == 7 and q.resume
    assert isinstance(q.spec["search_space"], dict)  # resolved inline
    assert q.max_t is None and q.epochs == 3 and q.target_epochs == 3 and q.custom_resources == {"w": 1.0}
    assert trial_bundles(q) == [{"CPU": 2.0, "GPU": 0.0, "w": 1.0}] * 2
    with pytest.raises(PayloadError, match="JSON object"):
        JobPayload.from_json("[1]")
