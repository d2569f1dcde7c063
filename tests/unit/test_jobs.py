"""service.core.jobs.JobInfo: which study status a Ray job's end means (INTERRUPTED vs FAILED)."""

from __future__ import annotations

import pytest

from service.core.jobs import JobInfo


def job(status: str, exit_code: int | None = None, error_type: str | None = None) -> JobInfo:
    return JobInfo.from_json({"submission_id": "bonn-sweep-abc", "status": status, "driver_exit_code": exit_code,
                              "error_type": error_type, "message": "Job entrypoint command failed"})


@pytest.mark.parametrize(("info", "study", "says"), [
    (job("RUNNING"), "RUNNING", None),
    (job("SUCCEEDED", 0), "SUCCEEDED", None),
    (job("STOPPED"), "CANCELLED", None),  # a cancel: Tune saved its state
    (job("FAILED", 1, "JOB_ENTRYPOINT_COMMAND_ERROR"), "FAILED", None),  # the driver failed the study
    (job("FAILED", 2, "JOB_ENTRYPOINT_COMMAND_ERROR"), "FAILED", None),  # bad payload
    (job("FAILED", None, "RUNTIME_ENV_SETUP_FAILURE"), "FAILED", None),  # never ran
    (job("FAILED", -9, "JOB_ENTRYPOINT_COMMAND_ERROR"), "INTERRUPTED", "was killed by signal SIGKILL"),
    (job("FAILED", 137, "JOB_ENTRYPOINT_COMMAND_ERROR"), "INTERRUPTED", "SIGKILL (exit code 137)"),  # via a shell
    (job("FAILED", -11, "JOB_ENTRYPOINT_COMMAND_ERROR"), "INTERRUPTED", "SIGSEGV"),
    (job("FAILED", None, "JOB_SUPERVISOR_ACTOR_DIED"), "INTERRUPTED", "lost (JOB_SUPERVISOR_ACTOR_DIED)"),
    (job("SOMETHING_NEW"), None, None),
])
def test_study_status_of_a_job(info: JobInfo, study: str | None, says: str | None) -> None:
    assert info.study_status == study
    assert info.driver_interrupted == (study == "INTERRUPTED")
    if says:
        text = info.interruption_text("abc")
        assert says in text and "POST /studies/abc/resume" in text and "bonn-sweep-abc" in text, text
