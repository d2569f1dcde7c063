"""MLflowStudyCallback against a real MlflowClient on a SQLite tracking store, with fake Tune trials."""

from __future__ import annotations

import contextlib
import pickle
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("ray.tune")

from mlflow import MlflowClient  # noqa: E402

from service.core.mlflow_calls import flatten_params  # noqa: E402
from service.sweep.mlflow_callback import MLflowStudyCallback, numeric_metrics, resolved_config  # noqa: E402
from service.sweep.stop_reasons import error_reason  # noqa: E402

STUDY = "study-unit"


# -- fakes --------------------------------------------------------------------------------------------


class FakeTrial:
    def __init__(self, trial_id: str, config: dict, tmp: Path):
        self.trial_id = trial_id
        self.config = config
        self.last_result: dict = {}
        self._tmp = tmp
        self.error_file = None
        self.run_metadata = SimpleNamespace(num_failures=0)

    def __str__(self) -> str:
        return f"train_bonn_{self.trial_id}"


class FakeCheckpoint:
    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class FakeLink:
    def __init__(self):
        self.attrs: dict[str, dict] = {}

    def set_trial_attrs(self, tid, attrs):
        self.attrs.setdefault(tid, {}).update(attrs)
        return True

    def trial_number(self, tid):
        return 7


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db"


@pytest.fixture()
def exp(tracking_uri, request):
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = client.create_experiment(f"exp-{request.node.name}")
    parent = client.create_run(exp_id, run_name="parent", tags={"study_id": STUDY})
    return SimpleNamespace(client=client, exp_id=exp_id, parent=parent.info.run_id, uri=tracking_uri)


def make_cb(exp, **kw) -> MLflowStudyCallback:
    kw.setdefault("default_epochs", 10)
    return MLflowStudyCallback(
        tracking_uri=exp.uri, experiment_id=exp.exp_id, parent_run_id=exp.parent, study_id=STUDY,
        metric="val_acc", mode="max", backoff_s=0.01, **kw,
    )


def epoch_result(epoch: int, val_acc: float) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "val_acc": val_acc, "train_loss": 1.0 / epoch,
            "config": {"x": 1}, "trial_id": "x", "done": False, "timestamp": 123, "pid": 1, "hostname": "h"}


def run_epochs(cb, trial, tmp: Path, epochs, values, png_epochs=()):
    for e, v in zip(epochs, values):
        res = epoch_result(e, v)
        cb.on_trial_result(iteration=e, trials=[trial], trial=trial, result=res)
        trial.last_result = res
        d = tmp / f"{trial.trial_id}_ck{e}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "checkpoint.pt").write_bytes(b"weights-%d" % e)
        if e in png_epochs:
            (d / f"weights_hist_epoch{e:03d}.png").write_bytes(b"\x89PNG fake")
        cb.on_checkpoint(iteration=e, trials=[trial], trial=trial, checkpoint=FakeCheckpoint(d))


def child_runs(exp, trial_id=None):
    flt = f"tags.study_id = '{STUDY}' and tags.`mlflow.parentRunId` = '{exp.parent}'"
    if trial_id:
        flt += f" and tags.tune_trial_id = '{trial_id}'"
    return exp.client.search_runs([exp.exp_id], filter_string=flt)


def artifact_paths(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out |= artifact_paths(client, run_id, f.path)
        else:
            out.add(f.path)
    return out


# -- tests --------------------------------------------------------------------------------------------


def test_flatten_params_and_metric_filter():
    flat = flatten_params({"lam": 1e-4, "lr_milestones": [0.3, 0.6], "nested": {"a": 1}, "block_style": None})
    assert flat == {"lam": "0.0001", "lr_milestones": "[0.3, 0.6]", "nested.a": "1", "block_style": "None"}
    m = numeric_metrics({"val_acc": 0.5, "done": True, "pid": 3, "loss": float("nan"), "name": "x", "flag": True})
    assert m == {"val_acc": 0.5}


def test_resolved_config_logs_defaults():
    cfg = resolved_config({"lam": 0.01, "epochs": 3})
    assert cfg["lam"] == 0.01 and cfg["epochs"] == 3
    # keys the study never set are there with TrainConfig's defaults
    for key in ("theta", "nu", "lr", "lr_gamma", "hist_epochs", "model", "binarize", "seed"):
        assert key in cfg


def test_completed_trial_run(exp, tmp_path):
    link = FakeLink()
    cb = make_cb(exp, optuna_link=link)
    trial = FakeTrial("aaa_00000", {"lam": 1e-3, "theta": 2e-3, "nu": 3e-4, "epochs": 3}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1, 2, 3], [0.5, 0.8, 0.7], png_epochs=(2,))
    cb.on_trial_complete(iteration=4, trials=[trial], trial=trial)

    runs = child_runs(exp)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "train_bonn_aaa_00000"
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["stop_reason"] == "completed"
    assert tags["tune_trial_id"] == "aaa_00000" and tags["optuna_trial_number"] == "7"
    params = run.data.params
    assert params["lam"] == "0.001" and params["theta"] == "0.002" and params["nu"] == "0.0003"
    assert "lr_gamma" in params and "weight_decay" in params  # defaults logged too
    hist = exp.client.get_metric_history(run.info.run_id, "val_acc")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 0.5), (2, 0.8), (3, 0.7)]
    assert "pid" not in run.data.metrics and "timestamp" not in run.data.metrics
    arts = artifact_paths(exp.client, run.info.run_id)
    assert {"checkpoints/epoch_001/checkpoint.pt", "checkpoints/epoch_002/checkpoint.pt",
            "checkpoints/epoch_003/checkpoint.pt", "checkpoints/epoch_002/weights_hist_epoch002.png",
            "plots/weights_hist_epoch002.png"} <= arts
    # Optuna attrs via the link: best is epoch 2, its checkpoint is the best checkpoint
    a = link.attrs["aaa_00000"]
    assert a["mlflow_run_id"] == run.info.run_id
    assert a["best_value"] == 0.8 and a["best_epoch"] == 2 and a["last_value"] == 0.7 and a["epochs_done"] == 3
    assert a["checkpoint_uri"].endswith("/checkpoints/epoch_002")
    assert a["checkpoint_uri"].startswith(run.info.artifact_uri)
    # parent: best_so_far after the first finished trial
    parent_hist = exp.client.get_metric_history(exp.parent, "best_so_far")
    # (objective.selection=best, the callback's default: the best epoch's value, like its checkpoint)
    assert [(m.step, m.value) for m in parent_hist] == [(1, 0.8)]


def test_early_stopped_error_and_cancelled(exp, tmp_path):
    cb = make_cb(exp, max_t=4)
    t1 = FakeTrial("bbb_00001", {"epochs": 10}, tmp_path)  # ASHA max_t=4: target 4 epochs
    t2 = FakeTrial("bbb_00002", {"epochs": 4}, tmp_path)
    t3 = FakeTrial("bbb_00003", {"epochs": 4}, tmp_path)
    t4 = FakeTrial("bbb_00004", {"epochs": 10}, tmp_path)
    for t in (t1, t2, t3, t4):
        cb.on_trial_start(iteration=0, trials=[], trial=t)
    run_epochs(cb, t1, tmp_path, [1, 2], [0.3, 0.4])
    cb.on_trial_complete(iteration=1, trials=[], trial=t1)  # stopped by ASHA at 2 < 4
    run_epochs(cb, t2, tmp_path, [1], [0.2])
    err = tmp_path / "error.txt"
    err.write_text("Traceback ...\nRuntimeError: boom\n")
    t2.error_file = str(err)
    cb.on_trial_error(iteration=2, trials=[], trial=t2)
    run_epochs(cb, t4, tmp_path, [1, 2, 3, 4], [0.1, 0.2, 0.3, 0.6])
    cb.on_trial_complete(iteration=3, trials=[], trial=t4)  # reached max_t: completed
    run_epochs(cb, t3, tmp_path, [1], [0.5])
    cb.on_experiment_end(trials=[t1, t2, t3, t4])  # t3 still running: cancelled

    by_id = {r.data.tags["tune_trial_id"]: r for r in child_runs(exp)}
    assert len(by_id) == 4
    assert (by_id["bbb_00001"].data.tags["stop_reason"], by_id["bbb_00001"].info.status) == ("early_stopped", "FINISHED")
    assert (by_id["bbb_00002"].data.tags["stop_reason"], by_id["bbb_00002"].info.status) == ("error", "FAILED")
    assert "RuntimeError: boom" in by_id["bbb_00002"].data.tags["error"]
    assert (by_id["bbb_00003"].data.tags["stop_reason"], by_id["bbb_00003"].info.status) == ("cancelled", "KILLED")
    assert (by_id["bbb_00004"].data.tags["stop_reason"], by_id["bbb_00004"].info.status) == ("completed", "FINISHED")
    # best_so_far counts only completed trials: steps 1 (early) and 2 (error) have no completed one yet
    hist = exp.client.get_metric_history(exp.parent, "best_so_far")
    assert [(m.step, m.value) for m in hist] == [(3, 0.6)]


def test_state_restore_reuses_run_and_skips_logged_epochs(exp, tmp_path):
    cb = make_cb(exp)
    trial = FakeTrial("ccc_00000", {"epochs": 4}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1], [0.4])
    state = pickle.loads(pickle.dumps(cb.get_state()))  # what Tune saves
    # the run goes on after the saved state (a crash later loses these results from Tune's state)
    run_epochs(cb, trial, tmp_path, [2], [0.5])
    cb.on_experiment_end(trials=[trial])  # the interrupted run ends as cancelled
    run_id = cb.run_id("ccc_00000")
    assert exp.client.get_run(run_id).info.status == "KILLED"

    cb2 = pickle.loads(pickle.dumps(make_cb(exp)))  # Tune pickles callbacks into tuner.pkl
    cb2.set_state(state)
    cb2.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run = exp.client.get_run(run_id)
    assert run.info.status == "RUNNING" and "stop_reason" not in run.data.tags
    run_epochs(cb2, trial, tmp_path, [2, 3, 4], [0.5, 0.6, 0.65])  # epoch 2 is repeated after restore
    cb2.on_trial_complete(iteration=5, trials=[trial], trial=trial)

    runs = child_runs(exp, "ccc_00000")
    assert len(runs) == 1 and runs[0].info.run_id == run_id
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["stop_reason"] == "completed"
    steps = sorted(m.step for m in exp.client.get_metric_history(run_id, "val_acc"))
    assert steps == [1, 2, 3, 4]  # no duplicated epoch


def test_no_duplicate_run_without_state(exp, tmp_path):
    """Belt and braces: state lost, the run is found by its tune_trial_id tag."""
    cb = make_cb(exp)
    trial = FakeTrial("ddd_00000", {"epochs": 2}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1], [0.4])
    cb2 = make_cb(exp)
    cb2.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb2, trial, tmp_path, [1, 2], [0.4, 0.5])
    cb2.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    runs = child_runs(exp, "ddd_00000")
    assert len(runs) == 1
    assert sorted(m.step for m in exp.client.get_metric_history(runs[0].info.run_id, "val_acc")) == [1, 2]


def test_errored_trial_resumed_reopens_run(exp, tmp_path):
    cb = make_cb(exp)
    trial = FakeTrial("eee_00000", {"epochs": 2}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1], [0.4])
    cb.on_trial_error(iteration=1, trials=[trial], trial=trial)
    state = cb.get_state()
    cb2 = make_cb(exp)
    cb2.set_state(state)
    cb2.on_trial_start(iteration=0, trials=[trial], trial=trial)  # resume_errored=True
    run_epochs(cb2, trial, tmp_path, [2], [0.6])
    cb2.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    runs = child_runs(exp, "eee_00000")
    assert len(runs) == 1
    assert runs[0].data.tags["stop_reason"] == "completed" and runs[0].info.status == "FINISHED"


class FlakyClient:
    """Wraps a real client; the first `fail` calls of the named methods raise."""

    def __init__(self, real, fail: int, methods=("log_batch", "log_artifact", "log_artifacts", "create_run")):
        self.real, self.fail, self.methods = real, fail, set(methods)

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name not in self.methods:
            return attr

        def wrapped(*a, **kw):
            if self.fail > 0:
                self.fail -= 1
                raise ConnectionError("mlflow down")
            return attr(*a, **kw)

        return wrapped


def test_mlflow_hiccups_never_crash_and_metrics_catch_up(exp, tmp_path):
    cb = make_cb(exp, retries=2)
    trial = FakeTrial("fff_00000", {"epochs": 3}, tmp_path)
    cb._client = FlakyClient(MlflowClient(tracking_uri=exp.uri), fail=3)
    # create_run cannot reach the server: no retry loop, the callback goes offline and queues
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    assert cb.run_id(trial.trial_id) is None and cb.failed_calls == 1
    run_epochs(cb, trial, tmp_path, [1], [0.3])
    cb._client.fail = 2
    run_epochs(cb, trial, tmp_path, [2], [0.4])
    run_epochs(cb, trial, tmp_path, [3], [0.5])
    cb.on_trial_complete(iteration=3, trials=[trial], trial=trial)
    cb.on_experiment_end(trials=[trial])  # sends what is still queued
    assert cb.backlog() == 0
    run_id = cb.run_id(trial.trial_id)
    steps = sorted(m.step for m in exp.client.get_metric_history(run_id, "val_acc"))
    assert steps == [1, 2, 3]
    assert len(child_runs(exp, trial.trial_id)) == 1
    run = exp.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"


class DownClient:
    """Wraps a real client; every call raises ConnectionError while ``down``."""

    def __init__(self, real):
        self.real, self.down, self.calls_while_down = real, False, 0

    def __getattr__(self, name):
        attr = getattr(self.real, name)

        def wrapped(*a, **kw):
            if self.down:
                self.calls_while_down += 1
                raise ConnectionError("Connection refused")
            return attr(*a, **kw)

        return wrapped


def test_mlflow_outage_queues_everything_and_sends_it_in_order_when_back(exp, tmp_path):
    """An outage mid-trial: the epochs, checkpoints (spooled: Tune deletes its old ones meanwhile),
    the trial's end and the parent's best_so_far all reach MLflow once it is back; nothing twice."""
    link = FakeLink()
    cb = make_cb(exp, optuna_link=link, spool_dir=str(tmp_path / "spool"))
    client = DownClient(MlflowClient(tracking_uri=exp.uri))
    cb._client = client
    trial = FakeTrial("hhh_00000", {"epochs": 3}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1], [0.5])
    run_id = cb.run_id(trial.trial_id)
    client.down = True
    t0 = time.monotonic()
    run_epochs(cb, trial, tmp_path, [2, 3], [0.7, 0.6], png_epochs=(2,))
    for e in (2, 3):
        shutil.rmtree(tmp_path / f"{trial.trial_id}_ck{e}")  # Tune keeps only its last checkpoints
    cb.on_trial_complete(iteration=3, trials=[trial], trial=trial)
    cb.on_step_begin(iteration=4, trials=[trial])
    assert time.monotonic() - t0 < 2.0  # offline: no retry loops stall the sweep
    assert sorted(m.step for m in exp.client.get_metric_history(run_id, "val_acc")) == [1]
    assert exp.client.get_run(run_id).info.status == "RUNNING" and cb.backlog() > 0
    assert link.attrs[trial.trial_id]["checkpoint_uri"].endswith("/checkpoints/epoch_002")  # known in advance

    client.down = False
    cb.on_experiment_end(trials=[trial])
    assert cb.backlog() == 0
    hist = exp.client.get_metric_history(run_id, "val_acc")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.5), (2, 0.7), (3, 0.6)]
    run = exp.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    assert "lr_gamma" in run.data.params
    arts = artifact_paths(exp.client, run_id)
    assert {f"checkpoints/epoch_{e:03d}/checkpoint.pt" for e in (1, 2, 3)} <= arts
    assert {"checkpoints/epoch_002/weights_hist_epoch002.png", "plots/weights_hist_epoch002.png"} <= arts
    assert not list((tmp_path / "spool").rglob("*.pt"))  # spooled copies removed once uploaded
    assert [(m.step, m.value) for m in exp.client.get_metric_history(exp.parent, "best_so_far")] == [(1, 0.7)]
    assert len(child_runs(exp, trial.trial_id)) == 1


def test_trial_started_and_ended_during_an_outage_gets_its_run_afterwards(exp, tmp_path):
    cb = make_cb(exp)
    client = DownClient(MlflowClient(tracking_uri=exp.uri))
    client.down = True
    cb._client = client
    trial = FakeTrial("iii_00000", {"epochs": 2}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1, 2], [0.4, 0.5])
    err = tmp_path / "error.txt"
    err.write_text("Failure # 1\nTraceback ...\ntrainables.train.TrainingDiverged: non-finite training loss\n")
    trial.error_file = str(err)
    cb.on_trial_error(iteration=2, trials=[trial], trial=trial)
    assert cb.run_id(trial.trial_id) is None and not child_runs(exp, trial.trial_id)
    client.down = False
    cb.on_experiment_end(trials=[trial])
    (run,) = child_runs(exp, trial.trial_id)
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == "error"
    assert run.data.tags["error_reason"] == "TrainingDiverged: non-finite training loss"
    assert sorted(m.step for m in exp.client.get_metric_history(run.info.run_id, "val_acc")) == [1, 2]


def test_error_reason_is_the_last_exception_line():
    text = ("Failure # 1 (occurred at 2025-01-01)\nray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n"
            "  File \"/x/train.py\", line 625, in fit\n    raise TrainingDiverged(...)\n"
            "trainables.train.TrainingDiverged: non-finite training loss in epoch 1: train_loss=nan\n")
    assert error_reason(text) == "TrainingDiverged: non-finite training loss in epoch 1: train_loss=nan"
    assert error_reason("") == ""


def test_upload_policy_improved(exp, tmp_path):
    cb = make_cb(exp, upload="improved")
    trial = FakeTrial("ggg_00000", {"epochs": 4}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1, 2, 3, 4], [0.5, 0.4, 0.6, 0.55])
    cb.on_trial_complete(iteration=4, trials=[trial], trial=trial)
    arts = artifact_paths(exp.client, cb.run_id(trial.trial_id))
    epochs = sorted(p.split("/")[1] for p in arts if p.startswith("checkpoints/"))
    assert epochs == ["epoch_001", "epoch_003", "epoch_004"]  # improved, improved, final
    assert cb.record(trial.trial_id)["checkpoint_uri"].endswith("epoch_003")


def test_parent_run_has_one_owner_for_api_and_driver(exp):
    from service.core.mlflow_calls import TrackingError
    from service.core.parent_run import ParentRun

    spec = {"name": "n", "search_space": {"parameters": {}}, "base": {"epochs": 3, "lr_milestones": [0.5]},
            "resources": {"custom": {"w": 1}}}
    run_id = ParentRun(exp.uri).create(exp.exp_id, study_id="s", study_name="n", spec=spec, resolved_space={})
    run = exp.client.get_run(run_id)
    assert run.data.params == {"name": "n", "search_space": "inline", "base.epochs": "3",
                               "base.lr_milestones": "[0.5]", "resources.custom": '{"w": 1}'}
    assert run.data.tags["study_id"] == "s" and run.data.tags["bonn_sweep.role"] == "study"

    warnings: list[str] = []
    driver_side = ParentRun(exp.uri, run_id, tries=3, backoff_s=0.01, warn=warnings.append)
    driver_side.start("s")
    driver_side.log_metric("best_value", 0.5)
    driver_side.end("SUCCEEDED", {"registered_model": "m/1"})
    run = exp.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["best_value"] == 0.5
    assert run.data.tags["status"] == "SUCCEEDED" and run.data.tags["registered_model"] == "m/1"
    api_side = ParentRun(exp.uri, run_id)
    api_side.set_status("KILLED")  # the driver ended it: a final status stays
    assert exp.client.get_run(run_id).info.status == "FINISHED"
    api_side.set_status("RUNNING")  # a resume
    assert exp.client.get_run(run_id).info.status == "RUNNING"
    assert not warnings
    ParentRun(exp.uri, "no-such-run", tries=3, backoff_s=0.01, warn=warnings.append).set_tags({"a": 1})
    assert len(warnings) == 1 and "set_tags(a)" in warnings[0]
    with pytest.raises(TrackingError, match="no-such-run"):
        ParentRun(exp.uri, "no-such-run").set_status("FAILED")


def _ckpt_epochs(exp, cb, trial) -> list[str]:
    arts = artifact_paths(exp.client, cb.run_id(trial.trial_id))
    return sorted({p.split("/")[1] for p in arts if p.startswith("checkpoints/")})


def test_upload_policy_best_and_last_keeps_two_checkpoints(exp, tmp_path):
    """The StudySpec default: a run holds its best and its last checkpoint, superseded bests are
    deleted, plot epochs upload the plot alone."""
    cb = make_cb(exp, upload="best_and_last")
    trial = FakeTrial("bal_00000", {"epochs": 5}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1, 2, 3], [0.5, 0.4, 0.6], png_epochs=(2,))
    assert _ckpt_epochs(exp, cb, trial) == ["epoch_003"]  # epoch 1 superseded, epoch 2 only a plot
    arts = artifact_paths(exp.client, cb.run_id(trial.trial_id))
    assert "plots/weights_hist_epoch002.png" in arts
    run_epochs(cb, trial, tmp_path, [4, 5], [0.55, 0.52])
    cb.on_trial_complete(iteration=5, trials=[trial], trial=trial)
    assert _ckpt_epochs(exp, cb, trial) == ["epoch_003", "epoch_005"]  # best, last
    assert cb.record(trial.trial_id)["checkpoint_uri"].endswith("epoch_003")


def test_upload_policy_best_and_last_early_stopped_trial_gets_its_last(exp, tmp_path):
    cb = make_cb(exp, upload="best_and_last")
    trial = FakeTrial("bal_00001", {"epochs": 9}, tmp_path)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    run_epochs(cb, trial, tmp_path, [1, 2, 3], [0.6, 0.4, 0.5])
    trial.checkpoint = FakeCheckpoint(tmp_path / f"{trial.trial_id}_ck3")  # Tune's latest
    cb.on_trial_complete(iteration=3, trials=[trial], trial=trial)  # ASHA stopped it at 3 of 9
    assert _ckpt_epochs(exp, cb, trial) == ["epoch_001", "epoch_003"]
