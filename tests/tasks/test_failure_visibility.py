"""Guarantee 6 as ops see it: a job that ends failed or verification_failed ends its Celery
task in FAILURE with a readable exception (what Flower shows); retries show as retries,
never as failures; a successful job's task succeeds."""
from __future__ import annotations

import ast

import pytest

from tasks import enqueue_resolve, enqueue_transition
from tests.factories import wait_terminal
from tests.harness import TaskEvents, wait_for


def _task_of(events: TaskEvents, job_id: int) -> str:
    def find() -> str | None:
        for e in list(events.events):
            if e["type"] == "task-received" and ast.literal_eval(e.get("kwargs") or "{}").get("job_id") == job_id:
                return e["uuid"]
        return None

    return wait_for(find, timeout=30, message=f"the task of job {job_id}")


def _types(events: TaskEvents, task_id: str) -> list[str]:
    return [e["type"] for e in events.of(task_id) if e["type"] != "task-sent"]


def test_verification_failed_ends_the_task_in_failure_with_expected_and_observed(world, worker, task_events):
    sid = world.session(3401, reject_status_changes=True)
    job_id = enqueue_resolve(None, sid, "Done.")
    assert wait_terminal(job_id).state == "verification_failed"
    task_id = _task_of(task_events, job_id)
    [failed] = wait_for(lambda: task_events.of(task_id, "task-failed"), timeout=30, message="task-failed")
    assert failed["exception"].startswith("VerificationFailed(")
    assert f"job {job_id}: ticket 3401: expected status 9 (Resolved), observed 1 (New)" in failed["exception"]


def test_a_permanent_error_ends_the_task_in_failure_with_the_vendor_message(world, worker, task_events):
    sid = world.session(3402)
    world.sim.state.add_fault(action="error", status=403, operation="post_note")
    job_id = enqueue_resolve(None, sid, "x")
    assert wait_terminal(job_id).state == "failed"
    task_id = _task_of(task_events, job_id)
    [failed] = wait_for(lambda: task_events.of(task_id, "task-failed"), timeout=30, message="task-failed")
    assert failed["exception"].startswith("JobFailed(")
    assert "post_note failed with HTTP 403" in failed["exception"] and "security permission" in failed["exception"]


def test_retries_show_as_retries_and_only_the_end_counts(world, worker, task_events):
    sid = world.session(3403)
    world.sim.state.add_fault(action="error", status=503, operation="get_ticket", times=2)
    job_id = enqueue_transition(None, sid, 9)
    assert wait_terminal(job_id).state == "succeeded"
    task_id = _task_of(task_events, job_id)
    wait_for(lambda: task_events.of(task_id, "task-succeeded"), timeout=30, message="task-succeeded")
    kinds = _types(task_events, task_id)
    assert kinds.count("task-retried") == 2 and kinds.count("task-succeeded") == 1
    assert "task-failed" not in kinds
