"""fit() under torch.distributed: two gloo processes on the CPU (torch.multiprocessing, no Ray).

Checks the data-parallel contract of ``trainables.train`` (module docstring, "Data parallelism"):
both ranks end with identical weights and identical metrics, only rank 0 writes the checkpoint,
the report has the single-process keys plus ``world_size``, an interrupted data-parallel run resumes
exactly from rank 0's checkpoint, and the global-batch semantics hold (same steps per epoch, a
sensible accuracy next to the single-process run of the same config).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainables import fit
from trainables.checkpoint import CHECKPOINT_NAME
from trainables.train import METRIC_KEYS

torch.set_num_threads(1)

CFG = {"dataset": "digits", "model": "small_cnn", "epochs": 3, "batch_size": 64, "lr": 0.1, "schedule": "cosine",
       "device": "cpu", "num_threads": 1, "hist_epochs": [0, 3], "feature_loss_start_epoch": 1}
TIMING = {"images_per_s", "epoch_time_s"}


def _worker(rank: int, world: int, out: str, cfg: dict, ckdir: str | None) -> None:
    import torch.distributed as dist

    from trainables import train as train_mod

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    captured = {}
    orig = train_mod.Trainer.read_sums

    def spy(self):  # keep a handle on the trainer, to read the final state of every rank
        captured["trainer"] = self
        return orig(self)

    train_mod.Trainer.read_sums = spy
    try:
        seen: list[dict] = []
        ck = Path(ckdir or out) / f"ck{rank}"

        def report(m: dict) -> None:
            seen.append(m)
            if rank == 0 and m["epoch"] == 1 and ckdir is None:
                # fit writes the checkpoint before it reports: keep epoch 1's for the resume test
                shutil.copytree(ck, Path(out) / "epoch1" / "ck0")

        last = fit(cfg, report=report, checkpoint_dir=ck, log=lambda s: None)
        tr = captured["trainer"]
        state = {f"model.{k}": v.detach().clone() for k, v in tr.model.state_dict().items()}
        if tr.feature_loss is not None:
            state.update({f"feature_loss.{k}": v.detach().clone()
                          for k, v in tr.feature_loss.state_dict().items() if isinstance(v, torch.Tensor)})
        torch.save({"reports": seen, "last": last, "state": state}, Path(out) / f"rank{rank}.pt")
    finally:
        train_mod.Trainer.read_sums = orig
        dist.destroy_process_group()


def _run(tmp: Path, cfg: dict, world: int = 2, ckdir: Path | None = None) -> list[dict]:
    """Run ``fit`` on ``world`` gloo processes; rank r checkpoints to ``(ckdir or tmp)/ck{r}``."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "rendezvous").unlink(missing_ok=True)
    mp.start_processes(_worker, args=(world, str(tmp), cfg, str(ckdir) if ckdir else None), nprocs=world,
                       start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _no_timing(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMING}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, _run(tmp / "full", CFG)


def test_ranks_agree_and_only_rank0_checkpoints(ddp_run):
    tmp, (r0, r1) = ddp_run
    assert [m["epoch"] for m in r0["reports"]] == [1, 2, 3]
    # every metric, timings included (all-reduced), is the same on both ranks
    assert r0["reports"] == r1["reports"]
    for m in r0["reports"]:
        assert m["world_size"] == 2
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values())
    keys = set(r0["reports"][-1])
    assert {k for k in keys if "/" not in k} == set(METRIC_KEYS) | {"test_acc", "test_loss", "world_size"}
    assert {k for k in r0["reports"][0] if "/" not in k} == set(METRIC_KEYS) | {"world_size"}
    # rank 0 wrote the checkpoint (and the PNGs), rank 1 wrote nothing
    ck0 = tmp / "full" / "ck0"
    assert (ck0 / CHECKPOINT_NAME).exists() and (ck0 / "weights_hist_epoch003.png").exists()
    assert not (tmp / "full" / "ck1").exists()


def test_both_ranks_end_with_identical_weights(ddp_run):
    tmp, (r0, r1) = ddp_run
    s0, s1 = r0["state"], r1["state"]
    assert s0.keys() == s1.keys() and len(s0) > 10
    assert any(k.startswith("feature_loss.") for k in s0)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # the checkpoint rank 0 wrote holds that same state
    ck = torch.load(tmp / "full" / "ck0" / CHECKPOINT_NAME, weights_only=True)
    for k, v in ck["trainer"]["model"].items():
        assert torch.equal(v, s0["model." + k]), k


def test_interrupted_ddp_run_resumes_exactly(ddp_run, tmp_path):
    """Resume from rank 0's epoch-1 checkpoint of the full run: rank 0 reads it and broadcasts it
    (rank 1 has no checkpoint of its own); epochs 2 and 3 repeat the full run's numbers exactly."""
    tmp, (full, _) = ddp_run
    snap = tmp / "full" / "epoch1"
    assert torch.load(snap / "ck0" / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    r0, r1 = _run(tmp_path / "resume", CFG, ckdir=snap)
    assert [m["epoch"] for m in r0["reports"]] == [2, 3]
    assert r0["reports"] == r1["reports"]
    assert [_no_timing(m) for m in r0["reports"]] == [_no_timing(m) for m in full["reports"][1:]]
    for k, v in full["state"].items():
        assert torch.equal(v, r0["state"][k]), k


def test_global_batch_semantics_match_single_process(ddp_run):
    _, (r0, _) = ddp_run
    single: list[dict] = []
    fit(CFG, report=single.append, log=lambda s: None)
    assert [m["epoch"] for m in single] == [m["epoch"] for m in r0["reports"]]
    assert set(single[-1]) | {"world_size"} == set(r0["reports"][-1])
    for a, b in zip(single, r0["reports"]):
        # same lr schedule (same steps per epoch: batch_size is the global batch)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        # the kernel loss depends on the parameters only and starts from the same initialisation
        assert b["train_acc"] > 0 and b["val_acc"] > 0
    # two workers of 32 see the global batch of 64: the same training, up to BatchNorm's per-slice
    # statistics and the float order of the all-reduce
    assert r0["reports"][-1]["val_acc"] > 0.5 and single[-1]["val_acc"] > 0.5
    assert abs(r0["reports"][-1]["val_acc"] - single[-1]["val_acc"]) < 0.2
    assert r0["reports"][0]["kernel_loss"] == pytest.approx(single[0]["kernel_loss"], rel=0.05)


def test_batch_smaller_than_world_is_refused(monkeypatch):
    """The global batch must give every worker at least one sample (checked before any collective)."""
    from trainables import ConfigError
    from trainables import train as train_mod

    class FakeDist(train_mod.DistContext):
        def __init__(self):
            self.active, self.rank, self.world, self.backend = True, 0, 4, "gloo"

    monkeypatch.setattr(train_mod, "DistContext", FakeDist)
    with pytest.raises(ConfigError) as ei:
        fit({**CFG, "batch_size": 3, "epochs": 1}, log=lambda s: None)
    assert ei.value.field == "batch_size" and "data-parallel workers (4)" in str(ei.value)


# ----------------------------------------------------------------------------- resources of a trial
def _spec(**resources):
    from service.core.spec import StudySpec

    return StudySpec.model_validate({"name": "r", "search_space": "digits-smoke", "resources": resources})


def test_trial_bundles_one_per_worker_with_custom_resources():
    from service.core.payload import JobPayload
    from service.sweep.tuner import trial_bundles

    def payload(spec):
        return JobPayload(study_id="s", spec=spec.model_dump(mode="json"), mlflow_tracking_uri="m",
                          optuna_storage="o", tune_storage="t")

    plan = payload(_spec(cpus_per_trial=2, gpus_per_trial=1, data_parallel_workers=3, custom={"bonn_worker": 1}))
    assert plan.custom_resources == {"bonn_worker": 1.0}
    assert trial_bundles(plan) == [{"CPU": 2.0, "GPU": 1.0, "bonn_worker": 1.0}] * 3
    single = payload(_spec())
    assert trial_bundles(single) == [{"CPU": 1.0, "GPU": 0.0}]


@pytest.mark.parametrize("resources, loc, msg", [
    ({"custom": {"": 1}}, ("resources", "custom"), "non-empty"),
    ({"custom": {" w": 1}}, ("resources", "custom"), "spaces"),
    ({"custom": {"CPU": 1}}, ("resources", "custom"), "Ray resource of its own"),
    ({"custom": {"node:10.0.0.1": 1}}, ("resources", "custom"), "Ray resource of its own"),
    ({"custom": {"w": 0}}, ("resources", "custom"), "> 0"),
    ({"custom": {"w": -2}}, ("resources", "custom"), "> 0"),
    ({"custom": {"w": 1.5}}, ("resources", "custom"), "whole number"),
    ({"custom": {"w": 0.00001}}, ("resources", "custom"), "0.0001"),
    ({"gpus_per_trial": 0.5, "data_parallel_workers": 2}, ("resources", "data_parallel_workers"), "0 or 1"),
    ({"gpus_per_trial": 2, "data_parallel_workers": 2}, ("resources", "data_parallel_workers"), "0 or 1"),
])
def test_bad_resources_are_refused(resources, loc, msg):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as ei:
        _spec(**resources)
    (err,) = ei.value.errors()
    assert tuple(err["loc"]) == loc and msg in err["msg"], err


@pytest.mark.parametrize("resources", [
    {"custom": {"bonn_worker": 1}}, {"custom": {"a": 0.25, "b": 3}},
    {"gpus_per_trial": 0.25}, {"gpus_per_trial": 1, "data_parallel_workers": 4},
    {"gpus_per_trial": 0, "data_parallel_workers": 2},
])
def test_good_resources_pass(resources):
    got = _spec(**resources).resources.model_dump()
    assert {k: got[k] for k in resources} == resources


if __name__ == "__main__":  # pragma: no cover - a quick manual look at the numbers
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = _run(Path(d), CFG)
        print(json.dumps(out[0]["reports"], indent=1))
        print(os.listdir(d))
