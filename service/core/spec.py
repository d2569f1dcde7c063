"""StudySpec: the request body of ``POST /studies`` and the ``spec`` of a study driver's job payload.

Every model forbids unknown keys, so a typo is a 422 that names the field. Validation goes as deep
as it can before any compute is spent:

1. structure and ranges (pydantic: types, ``>= 1``, ``> 0``, literals);
2. ``search_space``: a preset name (:func:`search_spaces.load_preset`; never a file path: the API
   must not read its own files) or an inline dict (:func:`search_spaces.load`); its
   ``SearchSpaceError.errors`` become errors located under ``search_space``;
3. ``base``: keys must be trial-config keys (``search_spaces.TRIAL_CONFIG_KEYS``) and must not
   be searched by the space; then the trial config a trial would really receive -- the space's fixed
   values, one random sample of the space, and ``base`` on top -- is checked by
   :meth:`trainables.config.TrainConfig.from_dict`, so an impossible config (an unknown model, a
   missing ``data_root``) fails at POST time and not as a failed trial;
4. cross-field rules: ``grid`` needs a discrete space (categorical, int, stepped float; no
   conditions -- ``SearchSpace.grid()``), ASHA's ``grace_period <= max_t``;
   ``scheduler.max_t`` defaults to the trial's ``epochs``.

Merge order of a trial's config (the driver uses :meth:`StudySpec.trial_defaults` the same way):
``{**space.fixed, **sampled params, **base}``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

#: Per-epoch metrics of ``trainables.fit`` a study may optimise. ``test_*`` are deliberately absent:
#: every search decision uses the validation split.
ObjectiveMetric = Literal[
    "val_acc",
    "val_loss",
    "train_acc",
    "train_loss",
    "ce_loss",
    "kernel_loss",
    "feature_loss",
    "bimodality",
    "flip_frac",
    "images_per_s",
]
OBJECTIVE_METRICS: tuple[str, ...] = get_args(ObjectiveMetric)

NAME_PATTERN = r"^[A-Za-z0-9_.\- ]+$"
DEFAULT_EPOCHS = 10  # trainables' default for `epochs`, used when neither base nor the space sets it


class _Strict(BaseModel):
    # strict: JSON types as the schema says (no "8" for 8, no true for 1.0); found by schemathesis
    model_config = ConfigDict(extra="forbid", strict=True)


#: Metrics a further objective (``objective.also``) may name: the per-epoch metrics above and the
#: epoch's wall time (a trial's cost; every epoch of a trial has the same work).
AlsoMetric = Literal[ObjectiveMetric, "epoch_time_s"]
MAX_EXTRA_OBJECTIVES = 2


class ObjectiveTerm(_Strict):
    """One further objective of a multi-objective study."""

    metric: AlsoMetric = Field(description="per-epoch metric reported by the trial (its last epoch's value)")
    mode: Literal["max", "min"]


class Objective(_Strict):
    """``metric``/``mode``: the (primary) objective. ``also``: further objectives; with them the study is
    multi-objective -- Optuna searches the Pareto front of (metric, *also) with a multi-objective sampler
    (tpe, gp, random, nsga2, grid), each trial's last-epoch values are its objective values, and the
    primary objective still ranks checkpoints and picks the registered model among the Pareto-optimal
    trials. ASHA cannot rank trials on several objectives: without an explicit ``scheduler`` such a
    study runs FIFO, an explicit ``scheduler: {type: asha}`` is a 422."""

    metric: ObjectiveMetric = Field("val_acc", description="per-epoch metric reported by the trial")
    mode: Literal["max", "min"] = "max"
    selection: Literal["last", "best"] = Field(
        "last",
        description="which epoch of a trial counts: `last` = its last epoch's value is told to Optuna and that "
                    "epoch's checkpoint is registered; `best` = its best epoch's value and checkpoint",
    )
    also: list[ObjectiveTerm] = Field(
        default_factory=list, max_length=MAX_EXTRA_OBJECTIVES,
        description="further objectives (multi-objective study), e.g. [{metric: epoch_time_s, mode: min}]")

    @field_validator("also")
    @classmethod
    def _distinct(cls, v: list[ObjectiveTerm], info) -> list[ObjectiveTerm]:
        seen = {info.data.get("metric")}
        for i, term in enumerate(v):
            if term.metric in seen:
                raise ValueError(f"also[{i}].metric {term.metric!r} is already an objective of this study")
            seen.add(term.metric)
        return v

    @property
    def multi(self) -> bool:
        return bool(self.also)

    @property
    def metrics(self) -> list[str]:
        return [self.metric, *(t.metric for t in self.also)]

    @property
    def modes(self) -> list[str]:
        return [self.mode, *(t.mode for t in self.also)]


#: samplers that search a multi-objective study (objective.also)
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "gp", "random", "nsga2", "grid")


class Sampler(_Strict):
    type: Literal["tpe", "gp", "cmaes", "random", "grid", "nsga2"] = "tpe"
    seed: int | None = Field(None, description="sampler seed; null = nondeterministic")


class Scheduler(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep 1/reduction_factor at each rung")
    max_t: int | None = Field(None, ge=1, description="ASHA: max epochs; defaults to the trial's `epochs`")


class Budget(_Strict):
    num_trials: int = Field(16, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="stop starting trials after this many seconds")
    max_failed_trials: int = Field(3, ge=0, description="fail the study after more failed trials than this")


class Confirm(_Strict):
    """The confirmation stage (``service.sweep.confirm``): after the search, the ``top_k`` configurations
    (by the objective, on the validation split) and the search space's warm-start (paper) point are each
    trained again with ``seeds`` fresh seeds for ``epochs`` (default: the trial's full ``epochs``)."""

    seeds: int = Field(3, ge=1, le=20, description="fresh seeds per configuration")
    top_k: int = Field(1, ge=1, le=10, description="how many of the search's best configurations to confirm")
    epochs: int | None = Field(None, ge=1, description="epochs of a confirmation run; null = the trial's epochs")
    reference: bool = Field(True, description="also confirm the search space's first warm-start point")
class Checkpoints(_Strict):
    """Checkpoint retention per trial (docs/contracts.md, "Checkpoint retention").

    ``keep`` (Tune's storage): ``best_and_last`` = the best epoch by the objective plus the latest
    (Tune's ``num_to_keep=1`` with the objective as score; the latest is what a resume continues from),
    ``last`` = only the latest, ``all`` = every epoch.
    ``upload`` (MLflow): ``best_and_last`` = a run holds at most two checkpoints, its best epoch's and its
    last epoch's (a superseded best is deleted from the run once the new best is uploaded; epochs with
    a histogram plot upload the plot only), ``improved`` = every improving epoch, the final one and plot
    epochs, ``all`` = every epoch, ``none``.
    """

    keep: Literal["best_and_last", "last", "all"] = "best_and_last"
    upload: Literal["best_and_last", "improved", "all", "none"] = "best_and_last"


#: Ray's own resource names: a StudySpec sets them through cpus_per_trial / gpus_per_trial, never `custom`.
RAY_RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class Resources(_Strict):
    """What one trial asks of the cluster, **per worker** (a data-parallel trial has
    ``data_parallel_workers`` workers, each with these resources; see trainables/tune.py)."""

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(
        0.0, ge=0,
        description="fractions share a GPU (logical, no memory cap): 0.25 packs 4 trials per GPU. Shared GPUs are "
                    "time-sliced unless the node runs MPS (`bonn-sweep up --mps`, BONN_SWEEP_MPS=true on compose GPU "
                    "workers), which runs the trials' kernels concurrently; docs/cluster.md")
    data_parallel_workers: int = Field(1, ge=1, description="workers per trial; resources are per worker")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per worker, e.g. {bonn_worker: 1}: trials then run only on nodes "
                    "started with that resource (`ray start --resources`)",
    )

    @field_validator("data_parallel_workers")
    @classmethod
    def _whole_gpus_for_ddp(cls, v: int, info) -> int:
        gpus = info.data.get("gpus_per_trial")
        if v > 1 and gpus is not None and gpus not in (0, 1):
            raise ValueError(
                f"a data-parallel trial uses one whole GPU per worker: with data_parallel_workers={v}, "
                f"gpus_per_trial must be 0 or 1 (got {gpus:g}; NCCL cannot put two ranks on one GPU)")
        return v

    @field_validator("custom")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        import math

        for name, amount in v.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError("resource names must be non-empty")
            if name != name.strip():
                raise ValueError(f"resource name {name!r} has leading or trailing spaces")
            if name in RAY_RESERVED_RESOURCES or name.startswith(("node:", "accelerator_type:")):
                raise ValueError(f"{name!r} is a Ray resource of its own; use cpus_per_trial / gpus_per_trial")
            if isinstance(amount, bool) or not math.isfinite(amount) or amount <= 0:
                raise ValueError(f"{name}: amount must be > 0 (got {amount!r})")
            if amount > 1 and amount != int(amount):
                raise ValueError(f"{name}: an amount above 1 must be a whole number (Ray's rule; got {amount:g})")
            if amount < 1 and abs(amount * 10000 - round(amount * 10000)) > 1e-6:  # (x*1e4 overflows for huge x)
                raise ValueError(f"{name}: Ray resolves resources to 0.0001 (got {amount!r})")
        return v


def _custom(loc: tuple, msg: str, value: Any, kind: str = "value_error") -> InitErrorDetails:
    # The message goes through str.format by pydantic-core: escape braces.
    safe = msg.replace("{", "{{").replace("}", "}}")
    return InitErrorDetails(type=PydanticCustomError(kind, safe), loc=loc, input=value)


class StudySpec(_Strict):
    """A study: what to search, how to train each trial, when to stop, what each trial may use."""

    name: Annotated[
        str,
        Field(min_length=1, max_length=100, description="1-100 chars: letters, digits, _ . - and spaces"),
    ]
    search_space: str | dict[str, Any] = Field(
        ..., description="a preset name (see `bonn-sweep spaces list`) or an inline search space"
    )
    base: dict[str, Any] = Field(default_factory=dict, description="fixed trial-config values")
    objective: Objective = Field(default_factory=Objective)
    sampler: Sampler = Field(default_factory=Sampler)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    confirm: Confirm | None = Field(
        None, description="the confirmation stage; null (default) = off, {} = on with its defaults")
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)

    _space: Any = PrivateAttr(default=None)  # the loaded search_spaces.SearchSpace

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "digits smoke",
                    "search_space": "digits-smoke",
                    "base": {"model": "small_cnn", "dataset": "digits", "epochs": 4},
                    "objective": {"metric": "val_acc", "mode": "max"},
                    "sampler": {"type": "tpe", "seed": 0},
                    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                    "budget": {"num_trials": 8, "max_concurrent_trials": 2},
                    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
                }
            ]
        },
    )

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v):
            bad = sorted({c for c in v if not re.fullmatch(NAME_PATTERN, c)})
            raise ValueError(f"may contain only letters, digits, '_', '.', '-' and spaces (got {''.join(bad)!r})")
        if not v.strip():
            raise ValueError("must contain a non-space character")
        return v.strip()

    @field_validator("search_space")
    @classmethod
    def _space_not_blank(cls, v: str | dict) -> str | dict:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must be a preset name or an inline search space")
        return v

    @model_validator(mode="after")
    def _deep_checks(self) -> StudySpec:
        import search_spaces

        # -- search space ------------------------------------------------------------------------
        # A string is a preset name, never a path: the API must not read files of its own machine
        # (the CLI loads a YAML file client-side and sends it inline).
        try:
            if isinstance(self.search_space, str):
                space = search_spaces.load_preset(self.search_space)
            else:
                space = search_spaces.load(self.search_space)
        except OverflowError as exc:  # a number beyond float range (JSON allows any size)
            raise ValidationError.from_exception_data(
                "StudySpec", [_custom(("search_space",), f"a number is too large: {exc}", None, "search_space")]
            ) from None
        except search_spaces.SearchSpaceError as exc:
            errors = [
                _custom(("search_space", *tuple(e.get("loc") or ())), str(e.get("msg", exc)), self.search_space,
                        "search_space")
                for e in (getattr(exc, "errors", None) or [{"loc": [], "msg": str(exc)}])
            ]
            raise ValidationError.from_exception_data("StudySpec", errors) from None
        self._space = space
        searched = set(_searched_names(space))
        fixed = dict(getattr(space, "fixed", {}) or {})

        # -- base: keys ---------------------------------------------------------------------------
        errors: list[InitErrorDetails] = []
        from search_spaces import TRIAL_CONFIG_KEYS

        allowed = set(TRIAL_CONFIG_KEYS)
        for key in self.base:
            if key not in allowed:
                close = _close_matches(key, allowed)
                hint = f"; did you mean {close!r}?" if close else ""
                errors.append(_custom(("base", key), f"unknown trial-config key {key!r}{hint}", key))
            elif key in searched:
                errors.append(
                    _custom(("base", key), f"{key!r} is searched by the search space; remove it from base", key)
                )
        if errors:
            raise ValidationError.from_exception_data("StudySpec", errors)

        # -- base: values, through the trial config a trial would receive ---------------------------
        try:
            sample = _sample(space)
        except OverflowError as exc:
            raise ValidationError.from_exception_data(
                "StudySpec", [_custom(("search_space",), f"cannot sample the space: {exc}", None, "search_space")]
            ) from None
        merged = {**fixed, **sample, **self.base}
        _check_train_config(merged, base=self.base, sample=sample)

        # -- cross-field rules ---------------------------------------------------------------------
        if self.sampler.type == "grid":
            try:
                space.grid()
            except search_spaces.SearchSpaceError as exc:
                detail = "; ".join(f"search_space.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors)
                raise ValidationError.from_exception_data(
                    "StudySpec",
                    [_custom(("sampler", "type"), f"sampler 'grid' needs a discrete search space: {detail}", "grid")],
                ) from None
        if self.scheduler.type == "asha":
            if self.scheduler.max_t is None:
                epochs = merged.get("epochs", DEFAULT_EPOCHS)
                self.scheduler.max_t = int(epochs) if isinstance(epochs, int) and epochs >= 1 else DEFAULT_EPOCHS
            if self.scheduler.grace_period > self.scheduler.max_t:
                raise ValidationError.from_exception_data(
                    "StudySpec",
                    [
                        _custom(
                            ("scheduler", "grace_period"),
                            f"grace_period={self.scheduler.grace_period} > max_t={self.scheduler.max_t} "
                            "(max_t defaults to epochs)",
                            self.scheduler.grace_period,
                        )
                    ],
                )
        if self.confirm is not None and self.confirm.top_k > self.budget.num_trials:
            raise ValidationError.from_exception_data(
                "StudySpec",
                [_custom(("confirm", "top_k"), f"top_k={self.confirm.top_k} > budget.num_trials="
                         f"{self.budget.num_trials}", self.confirm.top_k)],
            )
        return self

    @model_validator(mode="after")
    def _multi_objective(self) -> StudySpec:
        """A multi-objective study: a sampler that can search it, and no ASHA (FIFO unless said otherwise)."""
        if not self.objective.multi:
            return self
        if self.sampler.type not in MULTI_OBJECTIVE_SAMPLERS:
            raise ValidationError.from_exception_data("StudySpec", [_custom(
                ("sampler", "type"), f"sampler {self.sampler.type!r} cannot search several objectives "
                f"(objective.also); use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}", self.sampler.type)])
        if self.objective.selection == "best":
            raise ValidationError.from_exception_data("StudySpec", [_custom(
                ("objective", "selection"), "'best' picks one epoch by one metric; a multi-objective study "
                "(objective.also) tells Optuna each trial's last epoch: use selection 'last'", "best")])
        if "scheduler" not in self.model_fields_set:
            self.scheduler = Scheduler(type="fifo")
        elif self.scheduler.type == "asha":
            raise ValidationError.from_exception_data("StudySpec", [_custom(
                ("scheduler", "type"), "ASHA stops trials by one metric and cannot rank them on several "
                "objectives (objective.also): use scheduler {type: fifo}", "asha")])
        return self

    # -- helpers used by the API and the driver ------------------------------------------------------
    @property
    def space(self) -> Any:
        """The loaded ``search_spaces.SearchSpace``."""
        if self._space is None:  # e.g. built with model_construct
            import search_spaces

            ss = self.search_space
            self._space = search_spaces.load_preset(ss) if isinstance(ss, str) else search_spaces.load(ss)
        return self._space

    def resolved_space(self) -> dict[str, Any]:
        """The search space as an inline dict (a preset name resolved), JSON-serialisable."""
        return self.space.model_dump(mode="json")

    def trial_defaults(self) -> dict[str, Any]:
        """Fixed trial-config values: the space's fixed values with ``base`` on top."""
        return {**dict(getattr(self.space, "fixed", {}) or {}), **self.base}

    def to_job_spec(self) -> dict[str, Any]:
        """``model_dump(mode="json")`` with ``search_space`` resolved to its inline dict (job payload)."""
        data = self.model_dump(mode="json")
        data["search_space"] = self.resolved_space()
        return data

    def canonical_json(self) -> str:
        """Stable JSON of the spec as given (preset names kept): used to compare idempotent requests."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


# -- internals -------------------------------------------------------------------------------------


def _searched_names(space: Any) -> list[str]:
    """Every searched parameter, conditional ones included."""
    return list(space.parameters)


def _sample(space: Any) -> dict[str, Any]:
    """One random draw of the space through a throw-away in-memory Optuna study (seeded)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    fixed = space.define_by_run(trial) or {}
    return {**dict(trial.params), **dict(fixed)}


def _check_train_config(merged: dict[str, Any], *, base: dict[str, Any], sample: dict[str, Any]) -> None:
    from trainables.config import TrainConfig

    try:
        TrainConfig.from_dict(merged)
    except (ValueError, TypeError, OverflowError) as exc:  # trainables.ConfigError(ValueError): .field/.rule/.value
        field = getattr(exc, "field", None)
        if field in base or field is None or field not in sample:
            loc: tuple = ("base", field) if field else ("base",)
        else:
            loc = ("search_space", field)
        raise ValidationError.from_exception_data(
            "StudySpec", [_custom(loc, f"invalid trial config: {exc}", merged.get(field) if field else None)]
        ) from None


def _close_matches(word: str, choices: set[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.75)
    return m[0] if m else None


def format_errors(errors: list[dict[str, Any]]) -> list[str]:
    """``["loc.path: msg", ...]`` for CLI output."""
    out = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", []) if p != "body")
        out.append(f"{loc or '(body)'}: {e.get('msg', '')}")
    return out

