"""Running the study driver as a real Ray Job, for the integration tests that bypass the API; reading
its job log; killing a process of the stack by pid (fault tests)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

ROOT = str(Path(__file__).resolve().parents[2])
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def submit_driver_job(jobs: JobSubmissionClient, payload: dict, suffix: str = "") -> str:
    """Submit ``python -m service.sweep.driver`` with ``payload`` as the service does (SIGINT on stop)."""
    return jobs.submit_job(
        entrypoint=f"{sys.executable} -m service.sweep.driver",
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


def run_driver_job(jobs: JobSubmissionClient, payload: dict, suffix: str = "",
                   timeout: float = 400.0) -> tuple[JobStatus, str]:
    """Submit the driver job and wait for its end: ``(terminal status, job log)``."""
    job = submit_driver_job(jobs, payload, suffix)
    status = wait_job(jobs, job, timeout)
    return status, jobs.get_job_logs(job)


def job_payload(spec_dict: dict, *, mlflow_uri: str, optuna_storage: str, tune_storage: str,
                id_prefix: str) -> dict:
    """A validated StudySpec, its MLflow experiment and parent run, and the ``BONN_SWEEP_JOB`` payload
    the API would send (docs/contracts.md), for a fresh study id ``<id_prefix>-<hex>``."""
    from mlflow import MlflowClient

    from service.core.payload import JobPayload
    from service.core.spec import StudySpec

    spec = StudySpec.model_validate(spec_dict)
    client = MlflowClient(mlflow_uri)
    study_id = f"{id_prefix}-{uuid.uuid4().hex[:10]}"
    exp_id = client.create_experiment(f"bonn-sweep-{study_id}")
    parent = client.create_run(exp_id, run_name=spec.name, tags={"study_id": study_id})
    return JobPayload.build(
        study_id=study_id, spec=spec, num_trials=spec.budget.num_trials, mlflow_tracking_uri=mlflow_uri,
        experiment_id=exp_id, parent_run_id=parent.info.run_id, optuna_storage=optuna_storage,
        tune_storage=tune_storage, resume=False,
    ).model_dump(mode="json")


EPOCH_LINE = re.compile(r"trial train_bonn_(\w+) epoch (\d+)/\d+ ")


def epochs_by_trial(logs: str) -> dict[str, list[int]]:
    """{tune trial id: [epoch, ...]} in the order the driver received the results (its job log has a
    line ``trial <name> epoch E/N ...`` per result)."""
    out: dict[str, list[int]] = {}
    for m in EPOCH_LINE.finditer(logs):
        out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


def kill_pid(pid: int, *, expect_in_cmdline: str, timeout: float = 15.0) -> None:
    """SIGKILL one process by pid -- after checking that its command line names what we mean to kill --
    and wait until it is gone (reaped, or a zombie of its parent)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    assert expect_in_cmdline in cmdline, f"pid {pid} is {cmdline!r}, not {expect_in_cmdline!r}"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # our own child (the API): reap it
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat[stat.rindex(")") + 2] == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive {timeout}s after SIGKILL")
