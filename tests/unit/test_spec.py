"""StudySpec validation: a table of bad specs, each with the field it must name and the rule."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.core.spec import StudySpec

GOOD = {"name": "digits smoke", "search_space": "digits-smoke"}
INLINE = {
    "name": "inline",
    "parameters": {
        "lam": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "binarize": {"type": "categorical", "choices": ["bonn", "xnor"]},
    },
    "fixed": {"model": "small_cnn", "dataset": "digits", "epochs": 2},
}


def with_(**changes: object) -> dict:
    return {**GOOD, **changes}


def test_defaults_and_resolution() -> None:
    spec = StudySpec.model_validate(GOOD)
    assert spec.objective.metric == "val_acc" and spec.objective.mode == "max"
    assert spec.scheduler.type == "asha"
    assert spec.scheduler.max_t == 3  # digits-smoke fixes epochs: 3
    space = spec.resolved_space()
    assert set(space["parameters"]) == {"lam", "theta", "nu"}
    job = spec.to_job_spec()
    assert job["search_space"] == space and json.dumps(job)  # JSON-serialisable
    assert spec.trial_defaults()["model"] == "small_cnn"
    # the driver re-validates the job spec (inline space) to the same spec
    again = StudySpec.model_validate(job)
    assert again.resolved_space() == space and again.scheduler.max_t == 3


def test_base_overrides_fixed_and_sets_max_t() -> None:
    spec = StudySpec.model_validate(with_(base={"epochs": 5}))
    assert spec.scheduler.max_t == 5
    assert spec.trial_defaults()["epochs"] == 5


def test_inline_space_and_grid() -> None:
    StudySpec.model_validate({"name": "x", "search_space": INLINE})
    grid = StudySpec.model_validate(
        {"name": "g", "search_space": "bonn-paper-grid", "sampler": {"type": "grid"}, "base": {"data_root": "/data"}}
    )
    assert grid.sampler.type == "grid"


def test_canonical_json_stable() -> None:
    a = StudySpec.model_validate({**GOOD, "budget": {"num_trials": 4}})
    b = StudySpec.model_validate({"budget": {"num_trials": 4}, **GOOD})
    assert a.canonical_json() == b.canonical_json()


BAD = [
    ("unknown top-level field", with_(budgt={"num_trials": 2}), ("budgt",), "extra"),
    ("unknown nested field", with_(budget={"num_trails": 2}), ("budget", "num_trails"), "extra"),
    ("missing name", {"search_space": "digits-smoke"}, ("name",), "required"),
    ("name with slash", with_(name="a/b"), ("name",), "may contain only"),
    ("name too long", with_(name="x" * 101), ("name",), "at most 100"),
    ("blank name", with_(name="   "), ("name",), "non-space"),
    ("bad preset", with_(search_space="no-such-preset"), ("search_space",), "unknown preset"),
    ("path is not a preset", with_(search_space="/etc/passwd"), ("search_space",), "unknown preset"),
    (
        "low >= high inline",
        with_(search_space={**INLINE, "parameters": {"lam": {"type": "float", "low": 0.1, "high": 0.01}}}),
        ("search_space", "parameters", "lam"),
        "low must be < high",
    ),
    (
        "unknown param inline",
        with_(search_space={**INLINE, "parameters": {"lamda": {"type": "float", "low": 0.1, "high": 1}}}),
        ("search_space", "parameters", "lamda"),
        "lam",
    ),
    ("unknown base key", with_(base={"epoch": 3}), ("base", "epoch"), "did you mean 'epochs'"),
    ("searched key in base", with_(base={"lam": 0.1}), ("base", "lam"), "searched"),
    ("unknown model", with_(base={"model": "resnet99"}), ("base", "model"), "resnet99"),
    ("missing data_root", with_(base={"dataset": "cifar10"}), ("base", "data_root"), "data_root"),
    ("bad epochs value", with_(base={"epochs": 0}), ("base", "epochs"), "epochs"),
    ("objective metric", with_(objective={"metric": "test_acc", "mode": "max"}), ("objective", "metric"), "val_acc"),
    ("objective mode", with_(objective={"metric": "val_acc", "mode": "up"}), ("objective", "mode"), "'max' or 'min'"),
    ("sampler type", with_(sampler={"type": "bayes"}), ("sampler", "type"), "tpe"),
    ("grid on continuous space", with_(sampler={"type": "grid"}), ("sampler", "type"), "grid"),
    ("scheduler type", with_(scheduler={"type": "hyperband"}), ("scheduler", "type"), "asha"),
    ("grace period 0", with_(scheduler={"grace_period": 0}), ("scheduler", "grace_period"), "greater than or equal to 1"),
    ("reduction factor 1", with_(scheduler={"reduction_factor": 1}), ("scheduler", "reduction_factor"), "greater than 1"),
    ("grace > max_t", with_(scheduler={"grace_period": 4}), ("scheduler", "grace_period"), "max_t=3"),
    ("num_trials 0", with_(budget={"num_trials": 0}), ("budget", "num_trials"), "greater than or equal to 1"),
    ("concurrency 0", with_(budget={"max_concurrent_trials": 0}), ("budget", "max_concurrent_trials"), ">= 1"),
    ("time budget 0", with_(budget={"time_budget_s": 0}), ("budget", "time_budget_s"), "greater than 0"),
    ("max failed negative", with_(budget={"max_failed_trials": -1}), ("budget", "max_failed_trials"), "0"),
    ("cpus 0", with_(resources={"cpus_per_trial": 0}), ("resources", "cpus_per_trial"), "greater than 0"),
    ("gpus negative", with_(resources={"gpus_per_trial": -0.5}), ("resources", "gpus_per_trial"), "greater than or equal to 0"),
    ("dp workers 0", with_(resources={"data_parallel_workers": 0}), ("resources", "data_parallel_workers"), "1"),
]


@pytest.mark.parametrize("case, body, loc, msg", BAD, ids=[c[0] for c in BAD])
def test_bad_spec(case: str, body: dict, loc: tuple, msg: str) -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(body)
    errors = info.value.errors()
    hits = [e for e in errors if tuple(e["loc"][: len(loc)]) == loc]
    assert hits, f"{case}: no error at {loc}: {errors}"
    text = " | ".join(e["msg"] for e in hits).lower()
    if msg.startswith(">="):
        msg = "greater than or equal to 1"
    assert msg.lower() in text, f"{case}: {msg!r} not in {text!r}"


def test_fractional_gpus_allowed() -> None:
    spec = StudySpec.model_validate(with_(resources={"cpus_per_trial": 0.5, "gpus_per_trial": 0.25}))
    assert spec.resources.gpus_per_trial == 0.25


def test_checkpoint_retention_defaults_and_422() -> None:
    spec = StudySpec.model_validate(with_())
    assert (spec.checkpoints.keep, spec.checkpoints.upload) == ("best_and_last", "best_and_last")
    for body, loc in ((with_(checkpoints={"keep": "best"}), ("checkpoints", "keep")),
                      (with_(checkpoints={"upload": "some"}), ("checkpoints", "upload")),
                      (with_(checkpoints={"kep": "all"}), ("checkpoints", "kep"))):
        with pytest.raises(ValidationError) as info:
            StudySpec.model_validate(body)
        assert any(tuple(e["loc"][:2]) == loc for e in info.value.errors()), info.value.errors()


def test_checkpoint_config_for_tune() -> None:
    pytest.importorskip("ray.tune")
    from service.core.payload import JobPayload
    from service.sweep.tuner import checkpoint_config

    def cfg(**ck):
        p = JobPayload.build(study_id="s", spec=StudySpec.model_validate(with_(checkpoints=ck)), num_trials=1,
                             mlflow_tracking_uri="sqlite:///x.db", experiment_id="1", parent_run_id="r",
                             optuna_storage="sqlite:///o.db", tune_storage="/tmp/t", resume=False)
        return checkpoint_config(p)

    c = cfg()
    assert (c.num_to_keep, c.checkpoint_score_attribute, c.checkpoint_score_order) == (1, "val_acc", "max")
    assert cfg(keep="all").num_to_keep is None
    c = cfg(keep="last")
    assert (c.num_to_keep, c.checkpoint_score_attribute) == (1, None)


MO = {"metric": "val_acc", "mode": "max", "also": [{"metric": "epoch_time_s", "mode": "min"}]}


def test_multi_objective_spec_runs_fifo_and_names_its_objectives() -> None:
    spec = StudySpec.model_validate(with_(objective=MO))
    assert spec.objective.multi and spec.objective.metrics == ["val_acc", "epoch_time_s"]
    assert spec.objective.modes == ["max", "min"] and spec.scheduler.type == "fifo"
    assert StudySpec.model_validate(spec.to_job_spec()).scheduler.type == "fifo"  # the driver's view
    assert not StudySpec.model_validate(with_()).objective.multi
    assert StudySpec.model_validate(with_(objective=MO, sampler={"type": "nsga2", "seed": 1})).sampler.type == "nsga2"


@pytest.mark.parametrize("body, loc, msg", [
    (with_(objective=MO, scheduler={"type": "asha"}), ("scheduler", "type"), "cannot rank them on several"),
    (with_(objective=MO, sampler={"type": "cmaes"}), ("sampler", "type"), "cannot search several objectives"),
    (with_(objective={**MO, "also": [{"metric": "val_acc", "mode": "min"}]}), ("objective", "also"), "already"),
    (with_(objective={**MO, "also": [{"metric": "test_acc", "mode": "min"}]}), ("objective", "also", 0, "metric"),
     "epoch_time_s"),
    (with_(objective={**MO, "also": [{"metric": "epoch_time_s"}]}), ("objective", "also", 0, "mode"), "required"),
    (with_(objective={**MO, "also": [{"metric": m, "mode": "min"} for m in ("epoch_time_s", "val_loss", "train_loss")]}),
     ("objective", "also"), "at most 2"),
])
def test_bad_multi_objective_specs_name_the_field(body: dict, loc: tuple, msg: str) -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(body)
    hits = [e for e in info.value.errors() if tuple(e["loc"][: len(loc)]) == loc]
    assert hits and msg in " ".join(e["msg"] for e in hits), info.value.errors()
