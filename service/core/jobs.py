"""Ray Jobs client: plain HTTP (httpx) against the dashboard's Jobs REST API.

The API never calls ``ray.init()`` (it would replace uvicorn's signal handlers and tie the API's
life to a cluster connection); everything goes through ``/api/jobs/``, the same endpoints
``ray.job_submission.JobSubmissionClient`` uses, with our own timeouts and error types.

Auth: with ``RAY_AUTH_MODE=token`` the dashboard wants ``Authorization: Bearer <token>``;
pass it as ``token`` (``BONN_SWEEP_RAY_AUTH_TOKEN``). The embedded default runs Ray with
``RAY_AUTH_MODE=disabled`` and binds the dashboard to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import httpx

#: Ray job status -> study status (STOPPING is ours: between a cancel and the job's end).
RAY_TO_STUDY = {
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "STOPPED": "CANCELLED",
}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
#: exit codes of ``python -m service.sweep.driver`` when it ends a study itself: succeeded; failed (trials
#: failed, none completed, an exception, registration failed); bad payload (or invalid spec); cancelled
#: (SIGINT / SIGTERM, Tune state saved). Any other end of a FAILED job means the driver was cut off.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_PAYLOAD = 2
EXIT_CANCELLED = 130
DRIVER_EXIT_CODES = frozenset({EXIT_OK, EXIT_FAILED, EXIT_BAD_PAYLOAD, EXIT_CANCELLED})
#: job errors of a driver that was running and was lost with its Ray worker / node
LOST_DRIVER_ERRORS = frozenset({"JOB_SUPERVISOR_ACTOR_DIED"})


class RayUnavailable(RuntimeError):
    """The dashboard could not be reached (connection refused, timeout, 5xx)."""


class RayJobError(RuntimeError):
    """The Jobs API refused a request (4xx)."""

    def __init__(self, msg: str, status_code: int | None = None) -> None:
        super().__init__(msg)
        self.status_code = status_code


@dataclass
class JobInfo:
    submission_id: str
    status: str
    message: str | None = None
    start_time: int | None = None  # ms since epoch
    end_time: int | None = None
    metadata: dict[str, str] | None = None
    driver_exit_code: int | None = None
    error_type: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def driver_interrupted(self) -> bool:
        """A FAILED job whose driver did not end the study itself: killed by a signal (SIGKILL, the OOM
        killer: a negative exit code, or 128+N through a shell) or lost with the node it ran on. The
        study did not fail; its Tune state and Optuna study hold everything up to the last save."""
        if self.status != "FAILED":
            return False
        if self.error_type in LOST_DRIVER_ERRORS:
            return True
        return self.driver_exit_code is not None and self.driver_exit_code not in DRIVER_EXIT_CODES

    @property
    def study_status(self) -> str | None:
        """The study status this job status means: :data:`RAY_TO_STUDY`, but ``INTERRUPTED`` for a job
        whose driver was cut off (:attr:`driver_interrupted`); None for a Ray status we do not know."""
        if self.driver_interrupted:
            return "INTERRUPTED"
        return RAY_TO_STUDY.get(self.status)

    def interruption_text(self, study_id: str) -> str:
        """The study's ``error`` for an interrupted job: what happened and what to do."""
        code = self.driver_exit_code
        if code is not None and code < 0:
            how = f"killed by signal {_signal_name(-code)}"
        elif code is not None and code > 128:
            how = f"killed by signal {_signal_name(code - 128)} (exit code {code})"
        elif code is not None:
            how = f"exited with code {code}"
        else:
            how = f"lost ({self.error_type or 'job supervisor gone'})"
        return (f"interrupted: the study driver of Ray job {self.submission_id} was {how} before it could end "
                f"the study; POST /studies/{study_id}/resume continues it from the last saved Tune state and "
                "the Optuna study")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobInfo:
        return cls(
            submission_id=d.get("submission_id") or d.get("job_id") or "",
            status=str(d.get("status")),
            message=d.get("message"),
            start_time=d.get("start_time"),
            end_time=d.get("end_time"),
            metadata=d.get("metadata"),
            driver_exit_code=d.get("driver_exit_code"),
            error_type=d.get("error_type"),
        )


def driver_entrypoint(python: str | None = None) -> str:
    return f"{python or sys.executable} -m service.sweep.driver"


class RayJobsClient:
    def __init__(self, dashboard_url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        self.base_url = dashboard_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise RayUnavailable(f"Ray dashboard at {self.base_url} unreachable: {exc.__class__.__name__}: {exc}") from exc
        if r.status_code >= 500:
            raise RayUnavailable(f"Ray Jobs API {method} {path} -> {r.status_code}: {_short(r.text)}")
        if r.status_code in (401, 403):
            raise RayUnavailable(
                f"Ray Jobs API {method} {path} -> {r.status_code} (token auth? set BONN_SWEEP_RAY_AUTH_TOKEN)"
            )
        return r

    # -- API --------------------------------------------------------------------------------------
    def version(self) -> dict[str, Any]:
        r = self._request("GET", "/api/version")
        if r.status_code != 200:
            raise RayUnavailable(f"GET /api/version -> {r.status_code}")
        return r.json()

    def submit(
        self,
        *,
        entrypoint: str,
        submission_id: str,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
    ) -> str:
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id}
        if runtime_env:
            body["runtime_env"] = runtime_env
        if metadata:
            body["metadata"] = metadata
        if entrypoint_num_cpus:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        r = self._request("POST", "/api/jobs/", content=json.dumps(body), headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            text = _short(r.text)
            if "already exists" in text:  # a retry after a crash between submit and store update
                return submission_id
            raise RayJobError(f"job submission refused ({r.status_code}): {text}", r.status_code)
        return r.json().get("submission_id", submission_id)

    def get(self, submission_id: str) -> JobInfo | None:
        """The job's info, or ``None`` if the cluster does not know it (e.g. a restarted head)."""
        r = self._request("GET", f"/api/jobs/{submission_id}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RayJobError(f"GET job {submission_id} -> {r.status_code}: {_short(r.text)}", r.status_code)
        return JobInfo.from_json(r.json())

    def stop(self, submission_id: str) -> bool:
        r = self._request("POST", f"/api/jobs/{submission_id}/stop")
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            raise RayJobError(f"stop job {submission_id} -> {r.status_code}: {_short(r.text)}", r.status_code)
        return bool(r.json().get("stopped", False))

    def logs(self, submission_id: str) -> str:
        r = self._request("GET", f"/api/jobs/{submission_id}/logs")
        if r.status_code != 200:
            return ""
        return r.json().get("logs", "")

    def list(self) -> list[JobInfo]:
        r = self._request("GET", "/api/jobs/")
        if r.status_code != 200:
            raise RayJobError(f"list jobs -> {r.status_code}", r.status_code)
        return [JobInfo.from_json(d) for d in r.json()]


def _signal_name(num: int) -> str:
    import signal

    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _short(text: str, n: int = 500) -> str:
    text = (text or "").strip()
    # Ray answers 4xx/5xx with a Python traceback; its last line is the useful one.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 3:
        text = lines[-1]
    return text if len(text) <= n else text[: n - 3] + "..."
