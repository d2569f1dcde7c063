"""What the routes do: create / read / cancel / resume studies and reconcile their status with Ray.

Status comes from three places: the store (our row), the Ray job of the study's current submission
(PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED -> CANCELLED; FAILED because the driver was killed or
lost -> INTERRUPTED, see ``service.core.jobs.JobInfo.study_status``), and Optuna (trials). ``reconcile``
folds the Ray job status into the row; it runs on every read and in a background loop (so a study
finishes in the store even when nobody asks, also after an API restart).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from service.api.backends import MlflowGateway, OptunaReader, StudyView, TrackingError
from service.api.errors import ApiError, StateConflict
from service.core.jobs import RayJobError, RayJobsClient, RayUnavailable, driver_entrypoint
from service.core.parent_run import MLFLOW_STATUS_FOR_STUDY
from service.core.paths import PathNotAllowed, check_spec_paths
from service.core.payload import PAYLOAD_ENV, JobPayload
from service.core.settings import Settings
from service.core.spec import StudySpec
from service.core.store import (
    ActiveLimitReached,
    IdempotencyConflict,
    Study,
    StudyNotFound,
    StudyStatus,
    StudyStore,
    utcnow,
)

log = logging.getLogger("service.api")

ACTIVE = {StudyStatus.PENDING, StudyStatus.RUNNING, StudyStatus.STOPPING}
#: A job the cluster does not know (yet) is "lost" only after this long: Ray answers 404 for a moment
#: right after submission on a busy head.
LOST_JOB_GRACE = timedelta(seconds=30)
NEVER_SUBMITTED_GRACE = timedelta(seconds=120)
RESUMABLE = {st for st in StudyStatus if st.is_resumable}


def submission_id_for(study_id: str, resume_count: int = 0) -> str:
    """Ray forbids reusing a submission id: the n-th resume gets ``-r{n}``."""
    return f"bonn-sweep-{study_id}" + (f"-r{resume_count}" if resume_count else "")


def request_hash(spec: StudySpec, owner: str | None = None) -> str:
    """What an Idempotency-Key's replay must match: the canonical spec, and with ``owner`` (reads limited
    to each key's own studies) the key that sent it, so that no other key's replay, however timed, is
    answered with this study."""
    text = spec.canonical_json() + (f"\nowner={owner}" if owner else "")
    return hashlib.sha256(text.encode()).hexdigest()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def job_error_text(message: str | None, limit: int = 3000) -> str:
    """Ray's failure message (its first line plus the tail of the driver's log), ANSI colours removed,
    the driver's own ``study ... FAILED: ...`` line first when there is one."""
    text = _ANSI.sub("", message or "Ray job failed").strip()
    lines = text.splitlines()
    own = [ln for ln in lines if "[bonn-sweep" in ln and "FAILED" in ln]
    head = lines[0] if lines else ""
    if own:
        return (own[-1].strip() + "\n" + head)[:limit]
    return text if len(text) <= limit else head + "\n...\n" + text[-(limit - len(head) - 5) :]


ACTIVE_RETRY_AFTER_S = 30


def too_many_active(exc: ActiveLimitReached) -> ApiError:
    return ApiError(
        429,
        f"{exc.active} studies are PENDING, RUNNING or STOPPING; this server runs at most {exc.limit} at once "
        "(setting BONN_SWEEP_MAX_ACTIVE_STUDIES): retry when one has ended, or cancel one",
        ["limits", "max_active_studies"],
        "too_many_active_studies",
        {"Retry-After": str(ACTIVE_RETRY_AFTER_S)},
    )


def _ms_to_dt(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


class StudyService:
    def __init__(
        self,
        settings: Settings,
        store: StudyStore,
        jobs: RayJobsClient,
        tracking: MlflowGateway,
        trials: OptunaReader,
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.tracking = tracking
        self.trials = trials
        self.owner: str | None = None  # the API key of the request: recorded on the studies it creates
        self.only_own: str | None = None  # reads limited to this key's studies (api_reads_own_studies)

    def for_key(self, key_id: str | None, static: bool = False) -> None:
        """The request's key: new studies record it; with ``api_reads_own_studies`` a store key reads,
        cancels and resumes only its own studies (an operator key of ``api_keys`` sees every study)."""
        self.owner = key_id
        self.only_own = key_id if key_id and self.settings.api_reads_own_studies and not static else None

    # -- limits -----------------------------------------------------------------------------------
    def check_trials(self, n: int, loc: list[Any]) -> None:
        limit = self.settings.max_trials_per_study
        if n > limit:
            raise ApiError(
                422,
                f"num_trials={n} exceeds this server's limit of {limit} trials per study "
                "(setting BONN_SWEEP_MAX_TRIALS_PER_STUDY)",
                loc,
                "limit_exceeded",
            )

    def check_paths(self, spec: StudySpec) -> None:
        """422 naming the field for a path outside the data directories (service/core/paths.py)."""
        try:
            check_spec_paths(spec, self.settings.data_dirs or [])
        except PathNotAllowed as exc:
            raise ApiError(422, exc.msg, list(exc.loc), "path_not_allowed") from None

    # -- create -----------------------------------------------------------------------------------
    def create(self, spec: StudySpec, idempotency_key: str | None = None) -> tuple[Study, bool]:
        """Store, track, submit. Returns ``(study, created)``; ``created`` is False for an idempotent replay.
        An idempotent replay is answered even when the limits have changed since (it creates nothing)."""
        h = request_hash(spec, owner=self.only_own)
        if idempotency_key:
            existing = self.store.get_by_idempotency_key(idempotency_key)
            if existing is not None:
                if existing.request_hash != h:
                    raise IdempotencyConflict(idempotency_key)
                return existing, False
        self.check_trials(spec.budget.num_trials, ["body", "budget", "num_trials"])
        self.check_paths(spec)
        try:
            row, created = self.store.create(
                name=spec.name,
                spec_json=spec.canonical_json(),
                num_trials=spec.budget.num_trials,
                idempotency_key=idempotency_key,
                request_hash=h,
                max_active=self.settings.max_active_studies,
                api_key_id=self.owner,
            )
        except ActiveLimitReached as exc:
            raise too_many_active(exc) from None
        if not created:  # lost a race to an identical request: that one submits
            return row, False
        try:
            row = self._ensure_tracking(row, spec)
        except TrackingError as exc:
            return self._fail(row, f"MLflow: {exc}"), True
        return self._submit(row, spec, resume=False), True

    def _ensure_tracking(self, row: Study, spec: StudySpec) -> Study:
        if row.mlflow_experiment_id and row.mlflow_parent_run_id:
            return row
        exp_id = self.tracking.ensure_experiment(f"bonn-sweep/{spec.name}")
        run_id = self.tracking.create_parent_run(
            exp_id,
            study_id=row.id,
            study_name=spec.name,
            spec=spec.model_dump(mode="json"),
            resolved_space=spec.resolved_space(),
        )
        return self.store.update(row.id, mlflow_experiment_id=exp_id, mlflow_parent_run_id=run_id)

    def job_payload(self, row: Study, spec: StudySpec, *, resume: bool) -> JobPayload:
        return JobPayload.build(
            study_id=row.id,
            spec=spec,
            num_trials=row.num_trials,
            mlflow_tracking_uri=self.settings.mlflow_tracking_uri,
            experiment_id=row.mlflow_experiment_id,
            parent_run_id=row.mlflow_parent_run_id,
            optuna_storage=self.settings.optuna_storage,
            tune_storage=self.settings.tune_storage,
            resume=resume,
        )

    def _submit(self, row: Study, spec: StudySpec, *, resume: bool) -> Study:
        sub_id = submission_id_for(row.id, row.resume_count)
        payload = self.job_payload(row, spec, resume=resume)
        env_vars = {
            "RAY_JOB_STOP_SIGNAL": "SIGINT",
            "RAY_JOB_STOP_WAIT_TIME_S": str(self.settings.job_stop_wait_s),
            PAYLOAD_ENV: payload.to_json(),
        }
        try:
            self.jobs.submit(
                entrypoint=driver_entrypoint(self.settings.driver_python),
                submission_id=sub_id,
                runtime_env={"env_vars": env_vars},
                metadata={"study_id": row.id, "study_name": row.name, "bonn_sweep": "1"},
                entrypoint_num_cpus=self.settings.driver_num_cpus or None,
            )
        except (RayUnavailable, RayJobError) as exc:
            return self._fail(row, f"Ray job submission failed: {exc}", submission_id=sub_id)
        return self.store.update(
            row.id, submission_id=sub_id, submitted_at=utcnow(), ray_job_status="PENDING", error=None
        )

    def _fail(self, row: Study, msg: str, **fields: Any) -> Study:
        log.warning("study %s failed: %s", row.id, msg)
        updated = self.store.update(row.id, status=StudyStatus.FAILED, error=msg, finished_at=utcnow(), **fields)
        self._finish_parent_run(updated)
        return updated

    # -- read -------------------------------------------------------------------------------------
    def get(self, study_id: str, *, reconcile: bool = True) -> Study:
        row = self.store.get(study_id)
        if self.only_own is not None and row.api_key_id != self.only_own:
            raise StudyNotFound(study_id)  # another key's study: as if it did not exist
        return self.reconcile(row) if reconcile else row

    def list(self, *, status: StudyStatus | None, limit: int, offset: int) -> tuple[list[Study], int]:
        rows, total = self.store.list(status=status.value if status else None, limit=limit, offset=offset,
                                      api_key_id=self.only_own)
        rows = [self.reconcile(r) for r in rows]
        if status:  # reconcile may have moved a row out of the filter
            rows = [r for r in rows if r.status == status.value]
        return rows, total

    def optuna_view(self, study_id: str) -> StudyView:
        try:
            return self.trials.study(study_id)
        except Exception as exc:  # noqa: BLE001 - storage not reachable: answer without trials
            log.warning("optuna storage read failed for %s: %s", study_id, exc)
            return StudyView(exists=False)

    # -- cancel / resume --------------------------------------------------------------------------
    def cancel(self, study_id: str) -> Study:
        row = self.get(study_id)
        st = row.status_enum
        if st == StudyStatus.STOPPING:
            return row
        if st not in (StudyStatus.PENDING, StudyStatus.RUNNING):
            raise StateConflict(f"study {study_id} is {st.value}; only PENDING or RUNNING studies can be cancelled")
        if not row.submission_id:
            done = self.store.transition(
                study_id, {st}, status=StudyStatus.CANCELLED, finished_at=utcnow(), error="cancelled before submission"
            )
            return done or self.store.get(study_id)
        stopped = self.jobs.stop(row.submission_id)  # RayUnavailable -> 503
        if not stopped:
            info = self.jobs.get(row.submission_id)
            if info is not None and not info.is_terminal:
                raise ApiError(503, f"Ray did not accept the stop of job {row.submission_id}; retry", ["ray"])
            row = self.reconcile(self.store.get(study_id))  # the job ended before the stop
            if row.status_enum.is_terminal:
                raise StateConflict(f"study {study_id} is {row.status}; only PENDING or RUNNING studies can be cancelled")
            return row
        updated = self.store.transition(study_id, {StudyStatus.PENDING, StudyStatus.RUNNING}, status=StudyStatus.STOPPING)
        return updated or self.store.get(study_id)

    def resume(self, study_id: str, num_trials: int | None = None) -> Study:
        row = self.get(study_id)
        st = row.status_enum
        if not st.is_resumable:
            raise StateConflict(
                f"study {study_id} is {st.value}; only CANCELLED, FAILED or INTERRUPTED studies can be resumed"
            )
        if row.submission_id and row.submitted_at is not None:
            info = self.jobs.get(row.submission_id)
            if info is not None and not info.is_terminal:
                raise StateConflict(f"the previous job {row.submission_id} is still {info.status}; retry when it ends")
        spec = StudySpec.model_validate_json(row.spec_json)
        target = row.num_trials
        self.check_paths(spec)  # the data directories may have changed since the study was created
        if num_trials is not None:
            self.check_trials(num_trials, ["body", "num_trials"])
            started = self.optuna_view(study_id).counts()["total"]
            if num_trials < started:
                raise ApiError(
                    422, f"num_trials={num_trials} < {started} trials already in the study", ["body", "num_trials"],
                    "greater_than_equal",
                )
            target = num_trials
        # A study that failed before its first submission has nothing to resume from: submit fresh
        # (resume=True is still right: the driver restores only what exists). The row points at the
        # new submission id at once (submitted_at unset until Ray accepted it), so that a reconcile
        # running meanwhile never applies the previous job's end to the resumed study.
        n = row.resume_count + 1 if row.submission_id else row.resume_count
        try:
            updated = self.store.transition(
                study_id,
                RESUMABLE,
                max_active=self.settings.max_active_studies,
                status=StudyStatus.PENDING,
                resume_count=n,
                submission_id=submission_id_for(study_id, n),
                submitted_at=None,
                num_trials=target,
                error=None,
                finished_at=None,
                ray_job_status=None,
            )
        except ActiveLimitReached as exc:
            raise too_many_active(exc) from None
        if updated is None:
            raise StateConflict(f"study {study_id} changed state concurrently; retry")
        try:
            updated = self._ensure_tracking(updated, spec)
            if updated.mlflow_parent_run_id:
                self.tracking.set_run_status(updated.mlflow_parent_run_id, "RUNNING")
        except TrackingError as exc:
            self._fail(updated, f"MLflow: {exc}")
            raise
        result = self._submit(updated, spec, resume=True)
        if result.status_enum == StudyStatus.FAILED:  # the row says FAILED with the reason; retry later
            raise ApiError(503, result.error or "Ray job submission failed", ["ray"], "ray_unavailable")
        return result

    # -- reconcile --------------------------------------------------------------------------------
    def reconcile(self, row: Study) -> Study:
        st = row.status_enum
        if st.is_terminal:
            return row
        now = utcnow()
        if not row.submission_id or row.submitted_at is None:  # a submission is (or was) in progress
            if st == StudyStatus.PENDING and now - row.updated_at > NEVER_SUBMITTED_GRACE:
                return self._transition_final(
                    row, StudyStatus.FAILED, "never submitted to Ray (API restarted during submission?); resume it"
                )
            return row
        try:
            info = self.jobs.get(row.submission_id)
        except (RayUnavailable, RayJobError) as exc:
            log.debug("reconcile %s: %s", row.id, exc)
            return row
        if info is None:
            if now - row.submitted_at < LOST_JOB_GRACE:
                return row
            if st == StudyStatus.STOPPING:
                return self._transition_final(row, StudyStatus.CANCELLED, None)
            return self._transition_final(
                row,
                StudyStatus.INTERRUPTED,
                f"interrupted: Ray job {row.submission_id} no longer exists (cluster restarted?); "
                f"POST /studies/{row.id}/resume continues from the saved Tune state",
            )
        target = StudyStatus(info.study_status or st.value)
        fields: dict[str, Any] = {"ray_job_status": info.status}
        if info.start_time and row.started_at is None and info.status != "PENDING":
            fields["started_at"] = _ms_to_dt(info.start_time)
        if target.is_terminal:
            err = None
            if target == StudyStatus.FAILED:
                err = job_error_text(info.message)
            elif target == StudyStatus.INTERRUPTED:
                err = info.interruption_text(row.id)
            fields.update(finished_at=_ms_to_dt(info.end_time) or now)
            return self._transition_final(row, target, err, **fields)
        if st == StudyStatus.STOPPING:  # stays STOPPING until the job ends
            target = StudyStatus.STOPPING
        if target == st and all(getattr(row, k) == v for k, v in fields.items()):
            return row
        updated = self.store.transition(row.id, {st}, expect_submission=row.submission_id, status=target, **fields)
        return updated or self.store.get(row.id)

    def _transition_final(self, row: Study, status: StudyStatus, error: str | None, **fields: Any) -> Study:
        """End an active study -- only if it still points at the submission ``row`` was read with."""
        fields.setdefault("finished_at", utcnow())
        updated = self.store.transition(
            row.id, ACTIVE, expect_submission=row.submission_id, status=status, error=error, **fields
        )
        if updated is None:
            return self.store.get(row.id)
        log.info("study %s -> %s", row.id, status.value)
        self._finish_parent_run(updated)
        return updated

    def _finish_parent_run(self, row: Study) -> None:
        """The driver ends the parent run; this makes sure it ends even if the driver could not."""
        final = MLFLOW_STATUS_FOR_STUDY.get(row.status)
        if final and row.mlflow_parent_run_id:
            try:
                self.tracking.set_run_status(row.mlflow_parent_run_id, final)
            except TrackingError as exc:
                log.warning("could not finish MLflow run of %s: %s", row.id, exc)

    def reconcile_active(self) -> int:
        n = 0
        for row in self.store.active():
            try:
                self.reconcile(row)
                n += 1
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("reconcile of %s failed", row.id)
        return n


class ReconcileLoop:
    """Background thread: ``reconcile_active`` every ``interval_s`` (first run immediately)."""

    def __init__(self, service: StudyService, interval_s: float) -> None:
        self.service = service
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.service.reconcile_active()
            except Exception:  # noqa: BLE001
                log.exception("reconcile loop")
            self._stop.wait(self.interval_s)
