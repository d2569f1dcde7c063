"""The job payload: what the API hands a study driver (``BONN_SWEEP_JOB``, docs/contracts.md).

:class:`JobPayload` is built by the API (:meth:`JobPayload.build`) and parsed by the driver
(:meth:`JobPayload.from_json`): one model on both sides. Its ``spec`` is the StudySpec as JSON with the
search space resolved inline; the driver validates it once (:attr:`JobPayload.study_spec`, a
:class:`service.core.spec.StudySpec`) and reads every derived value (trial defaults, ``max_t``, target
epochs, resources) from the properties here. An invalid spec is still a bad payload (exit 2), but one
whose parent run the driver can end with the reason, so it is checked after the envelope.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.core.spec import DEFAULT_EPOCHS, StudySpec

#: the environment variable that carries the payload (JSON) to ``python -m service.sweep.driver``
PAYLOAD_ENV = "BONN_SWEEP_JOB"

_NonEmpty = Annotated[str, Field(min_length=1)]


class PayloadError(ValueError):
    """The payload is not a job payload (not JSON, a field missing or wrong)."""


class JobPayload(BaseModel):
    """``{"study_id", "spec", "mlflow_tracking_uri", "experiment_id", "parent_run_id", "optuna_storage",
    "tune_storage", "resume", "num_trials"}``; unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    study_id: _NonEmpty
    spec: dict[str, Any] = Field(description="StudySpec JSON, search_space inline (StudySpec.to_job_spec)")
    mlflow_tracking_uri: _NonEmpty
    optuna_storage: _NonEmpty = Field(description="SQLAlchemy URL of the Optuna RDB storage")
    tune_storage: _NonEmpty = Field(description="path or URI under which Tune keeps <study_id>/")
    experiment_id: str | None = None
    parent_run_id: str | None = None
    resume: bool = False
    num_trials: Annotated[int, Field(ge=1, strict=True)] | None = None

    @field_validator("experiment_id", "parent_run_id", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if v in (None, "") else v

    # -- the API ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, *, study_id: str, spec: StudySpec, num_trials: int, mlflow_tracking_uri: str,
              experiment_id: str | None, parent_run_id: str | None, optuna_storage: str, tune_storage: str,
              resume: bool) -> JobPayload:
        """The payload of one submission of a study: its spec with ``budget.num_trials`` = ``num_trials``
        (a resume may raise it) and the search space resolved inline."""
        job_spec = spec.to_job_spec()
        job_spec["budget"]["num_trials"] = num_trials
        return cls(study_id=study_id, spec=job_spec, mlflow_tracking_uri=mlflow_tracking_uri,
                   experiment_id=experiment_id, parent_run_id=parent_run_id, optuna_storage=optuna_storage,
                   tune_storage=tune_storage, resume=resume, num_trials=num_trials)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"))

    # -- the driver -------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text: str) -> JobPayload:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PayloadError(f"job payload is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PayloadError("payload must be a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PayloadError("; ".join(
                f"payload.{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()
            )) from None

    @cached_property
    def study_spec(self) -> StudySpec:
        """The spec, validated (raises pydantic's ValidationError or a search-space error)."""
        return StudySpec.model_validate(self.spec)

    @cached_property
    def trial_defaults(self) -> dict[str, Any]:
        """The param space of every trial: the space's fixed values with ``base`` on top."""
        return dict(self.study_spec.trial_defaults())

    @property
    def trials_requested(self) -> int:
        return int(self.num_trials or self.study_spec.budget.num_trials)

    @property
    def epochs(self) -> int:
        """A trial's ``epochs`` (trial defaults; trainables' default when they do not set it)."""
        return int(self.trial_defaults.get("epochs", DEFAULT_EPOCHS))

    @property
    def max_t(self) -> int | None:
        """ASHA's ``max_t`` (the spec's, else the trial's epochs); None without ASHA."""
        sched = self.study_spec.scheduler
        if sched.type != "asha":
            return None
        return int(sched.max_t) if sched.max_t else self.epochs

    @property
    def target_epochs(self) -> int:
        """Epochs after which a trial counts as completed."""
        return min(self.epochs, self.max_t) if self.max_t else self.epochs

    @property
    def custom_resources(self) -> dict[str, float]:
        """Custom Ray resources per worker, e.g. ``{"bonn_worker": 1.0}``."""
        return {str(k): float(v) for k, v in (self.study_spec.resources.custom or {}).items()}
