"""Running the study driver as a real Ray Job, for the integration tests that bypass the API."""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

ROOT = str(Path(__file__).resolve().parents[2])
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def submit_driver_job(jobs: JobSubmissionClient, payload: dict, suffix: str = "") -> str:
    """Submit ``python -m service.driver`` with ``payload`` as the service does (SIGINT on stop)."""
    return jobs.submit_job(
        entrypoint=f"{sys.executable} -m service.driver",
        submission_id=f"{payload['study_id']}{suffix}-{uuid.uuid4().hex[:4]}",
        metadata={"study_id": payload["study_id"], "study_name": payload["spec"]["name"]},
        runtime_env={"env_vars": {
            "BONN_SWEEP_JOB": json.dumps(payload),
            "RAY_JOB_STOP_SIGNAL": "SIGINT",
            "RAY_JOB_STOP_WAIT_TIME_S": "60",
            "PYTHONPATH": ROOT,
        }},
    )


def wait_job(jobs: JobSubmissionClient, job_id: str, timeout: float = 400.0) -> JobStatus:
    """The job's terminal status; stops it and fails with its log tail after ``timeout`` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = jobs.get_job_status(job_id)
        if st in TERMINAL:
            return st
        time.sleep(1.0)
    jobs.stop_job(job_id)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s:\n{jobs.get_job_logs(job_id)[-4000:]}")
