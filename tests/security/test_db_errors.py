"""Issue 11 section 4: a database error never leaks the note, and a long vendor string never
fails a job that worked. Real worker, real PostgreSQL, the ConnectWise simulator over HTTP."""
from __future__ import annotations

import ast
import uuid

import pytest
from sqlalchemy import text

from models.db import get_engine
from tasks import enqueue_resolve
from tests.factories import RESOLVED, session_row, wait_terminal
from tests.harness import TaskEvents, wait_for


def _task_of(events: TaskEvents, job_id: int) -> str:
    def find() -> str | None:
        for e in list(events.events):
            if e["type"] == "task-received" and ast.literal_eval(e.get("kwargs") or "{}").get("job_id") == job_id:
                return e["uuid"]
        return None

    return wait_for(find, timeout=30, message=f"the task of job {job_id}")


def test_a_300_character_status_name_is_stored_cut_and_the_job_still_verifies(world, worker):
    # given a board whose resolved status has a 300-character name (the columns hold 200)
    long_name = "Resolved " + "x" * 291
    world.sim.state.boards[1][RESOLVED] = (long_name, True)
    sid = world.session(7101)
    marker = f"note-body-{uuid.uuid4().hex}"
    mark = worker.mark()
    # when the session is resolved
    j = wait_terminal(enqueue_resolve(None, sid, f"Replaced the toner. {marker}"))
    # then the job succeeds and verifies, with the name cut to its column
    assert j.state == "succeeded", j.error_message
    assert j.result["outcome"] == "verified"
    # (the provider already cuts a vendor string to 200 with an ellipsis; the columns' clamp
    # is the guard behind it, tested with a forced DataError below)
    name = j.observed_status_name
    assert len(name) <= 200 and name.startswith(long_name[:190]) and j.expected_status_name == name
    assert j.error_message is None
    s = session_row(sid)
    assert s.status == "resolved"
    assert (s.psa_status_id, s.psa_status_name) == (RESOLVED, name)
    # and no log line carries the note's text
    log = worker.log_text(since=mark)
    assert f"job {j.id} succeeded" in log
    assert marker not in log


# Two ways the outcome's UPDATE can fail on data: a value too long for its column (DataError;
# its text used to carry the statement's parameters, note markdown included) and a CHECK
# constraint (its DETAIL line, "Failing row contains (...)", carries the row's values).
_FAULTS = {
    "data_error": ("ALTER TABLE ai_sessions ALTER COLUMN resolution_note_markdown TYPE varchar(10)",
                   "ALTER TABLE ai_sessions ALTER COLUMN resolution_note_markdown TYPE text", "DataError"),
    "check_violation": ("ALTER TABLE ai_sessions ADD CONSTRAINT ck_test_no_notes "
                        "CHECK (resolution_note_markdown IS NULL) NOT VALID",
                        "ALTER TABLE ai_sessions DROP CONSTRAINT ck_test_no_notes", "IntegrityError"),
}


@pytest.fixture(params=sorted(_FAULTS))
def broken_session_column(request):
    break_it, repair, error_type = _FAULTS[request.param]
    with get_engine().begin() as conn:
        conn.execute(text(break_it))
    yield error_type
    with get_engine().begin() as conn:
        conn.execute(text(repair))


def test_a_database_error_never_puts_the_note_in_error_message_logs_or_the_task_result(
        world, worker, task_events, broken_session_column):
    # given a session column the outcome's UPDATE cannot write
    sid = world.session(7102)
    marker = f"secret-note-{uuid.uuid4().hex}"
    mark = worker.mark()
    # when a resolve runs (its note is posted, its status verified, then the outcome fails)
    job_id = enqueue_resolve(None, sid, f"Customer password hint: {marker}")
    j = wait_terminal(job_id)
    # then the job ends failed with the error's type and SQLSTATE, and nothing of its text
    assert j.state == "failed"
    assert broken_session_column in j.error_message and "SQLSTATE" in j.error_message
    for leaked in (marker, "Customer password hint", "Failing row", "parameters", "UPDATE "):
        assert leaked not in j.error_message
        assert leaked not in str(j.result)
    # the task fails with the same short reason (what Flower shows)
    task_id = _task_of(task_events, job_id)
    [failed] = wait_for(lambda: task_events.of(task_id, "task-failed"), timeout=30, message="task-failed")
    assert failed["exception"].startswith("JobFailed(") and marker not in failed["exception"]
    assert "Failing row" not in failed["exception"]
    # and the worker's log names the error without its text
    log = wait_for(lambda: (t := worker.log_text(since=mark)) and f"job {job_id} failed" in t and t,
                   timeout=10, message="the outcome line")
    assert marker not in log and "Failing row" not in log and "[parameters:" not in log
    assert broken_session_column in log
    # the note itself did land once (nothing posted twice)
    assert len(world.sim.state.notes(7102)) == 1


def test_note_ids_too_long_for_their_column_never_fail_the_note_step():
    from providers.base import PostedNote
    from tasks.steps import _note_order, _watermark

    huge = "9" * 5000  # longer than int() accepts, and than note_watermark_id holds
    notes = [PostedNote("12", "a", None), PostedNote(huge, "b", None)]
    assert _watermark(notes) is None  # no paging by a watermark the column cannot hold
    assert sorted(notes, key=_note_order)[0].id == huge  # ordered, not a ValueError
    assert _watermark([PostedNote("12", "a", None), PostedNote("7", "b", None)]) == "12"
