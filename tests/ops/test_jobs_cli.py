"""`psa-writeback jobs ...` as an operator runs it (a subprocess), against a real worker:
find jobs, read one job's timeline, and retry / re-verify / cancel."""
from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from sqlalchemy import select, update

from models import Alert, JobAction, JobKind, WritebackJob, utcnow
from models.db import session_scope
from tasks import admin
from tasks.enqueue import build_job
from tests.factories import RESOLVED, job, session_row, wait_terminal
from tests.harness import wait_for
from tests.ops.conftest import ops_env, run_cli, start_worker, submit


@pytest.fixture(scope="module")
def repair_worker(ops_broker, tmp_path_factory):
    proc = start_worker(ops_broker, tmp_path_factory.mktemp("repair"))
    yield proc
    proc.stop()


@pytest.fixture()
def cli(ops_broker):
    env = ops_env(ops_broker, PSA_WRITEBACK_ACTOR="alice (on call)")
    return lambda *args: run_cli(*args, env=env)


def insert_job(world, ticket: int | None, **values) -> int:
    sid = world.session(ticket) if ticket else world.session(linked=False)
    with session_scope() as db:
        j = build_job(db, JobKind.RESOLVE, session_id=sid, markdown="Queued note.")
        db.flush()
        db.execute(update(WritebackJob).where(WritebackJob.id == j.id).values(**values))
        return j.id


def actions(job_id: int) -> list[JobAction]:
    with session_scope() as db:
        return list(db.scalars(select(JobAction).where(JobAction.job_id == job_id).order_by(JobAction.id)))


def test_list_filters_by_state_account_ticket_and_age(world, cli):
    now = utcnow()
    old_failed = insert_job(world, 9001, state="failed", created_at=now - dt.timedelta(hours=3),
                            error_message="gave up after 8 attempts")
    new_queued = insert_job(world, 9002)
    with session_scope() as db:
        admin.ensure_account(db, 2, name="Other MSP")
        other_sid = admin.create_session(db, account_id=2).id
        other = build_job(db, JobKind.RESOLVE, session_id=other_sid, markdown="x")
        db.flush()
        other_id = other.id

    def ids(*args: str) -> list[int]:
        out = cli("jobs", "list", "--json", *args)
        assert out.returncode == 0, out.stderr
        return [j["id"] for j in json.loads(out.stdout)]

    assert ids("--state", "failed") == [old_failed]
    assert ids("--state", "queued,failed", "--account", "1") == [new_queued, old_failed]
    assert ids("--account", "2") == [other_id]
    assert ids("--ticket", "9002") == [new_queued]
    assert ids("--older-than", "2h") == [old_failed]
    assert ids("--newer-than", "10m") == [other_id, new_queued]
    human = cli("jobs", "list", "--state", "failed").stdout
    assert human.splitlines()[0].split()[:4] == ["id", "kind", "state", "account"]
    assert f"{old_failed}  " in human and "gave up after 8 attempts" in human and "3h" in human
    assert cli("jobs", "list", "--older-than", "soon").returncode == 2  # a clear argparse error


def test_show_prints_the_whole_attempt_timeline(world, repair_worker, ops_client, cli):
    # given a job that needed a retry after a 503
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=1, ticket_id=48213)
    job_id = submit(ops_client, "resolve", world.session(48213), "Replaced the toner.")
    assert wait_terminal(job_id).state == "succeeded"
    # when the operator asks what happened to ticket 48213
    human = cli("jobs", "show", "--ticket", "48213")
    assert human.returncode == 0, human.stderr
    out = human.stdout
    # then the header and one timeline row per attempt: time, duration, HTTP status, error
    assert f"job {job_id} · resolve · succeeded" in out
    assert "ticket       connectwise #48213" in out and "expected 9 (Resolved), observed 9 (Resolved)" in out
    rows = [ln for ln in out.splitlines() if " attempt " in ln]
    assert len(rows) == 2
    assert " retry " in rows[0] and " 503 " in rows[0] and "PsaTransientError" in rows[0] and " ms " in rows[0]
    assert " succeeded " in rows[1]
    assert "outcome" in out and "finished" in out
    data = json.loads(cli("jobs", "show", str(job_id), "--json").stdout)
    history = data["attempt_history"]
    assert [a["http_status"] for a in history] == [503, None]
    assert all(a["duration_ms"] is not None and a["started_at"] and a["celery_task_id"] for a in history)
    # of each attempt's time, how much was spent waiting on the PSA (the 503 attempt too)
    assert all(0 <= a["psa_ms"] <= a["duration_ms"] for a in history), history
    assert "(PSA " in rows[1]
    assert cli("jobs", "show", "999999").returncode == 2


def test_retry_requeues_a_failed_job_with_a_fresh_budget(world, repair_worker, ops_client, cli):
    st = world.sim.state
    fault = st.add_fault(action="error", status=503, operation="post_note", times=-1, ticket_id=9101)
    job_id = submit(ops_client, "resolve", world.session(9101), "Reseated the RAM.", max_attempts=1)
    assert wait_terminal(job_id).state == "failed"
    assert cli("jobs", "reverify", str(job_id)).returncode == 1  # wrong repair for a failed job
    fault.times = 0  # the PSA is healthy again
    out = cli("jobs", "retry", str(job_id))
    assert out.returncode == 0, out.stderr
    assert f"[1/1] job {job_id}: retry ok (queued)" in out.stderr
    j = wait_for(lambda: (x := job(job_id)).state == "succeeded" and x, message="retried job succeeded")
    assert (j.attempts, j.max_attempts) == (2, 1 + 8)
    assert len(st.notes(9101)) == 1 and st.status_of(9101) == RESOLVED
    [act] = actions(job_id)
    assert (act.action, act.actor, act.from_state, act.to_state) == ("retry", "alice (on call)", "failed", "queued")
    assert "retry" in cli("jobs", "show", str(job_id)).stdout
    again = cli("jobs", "retry", str(job_id), "--json")
    assert again.returncode == 1 and json.loads(again.stdout)[0]["message"].startswith("job is succeeded")


def test_reverify_marks_the_job_verified_without_posting_or_patching_again(world, repair_worker, ops_client, cli):
    st = world.sim.state
    sid = world.session(9201, reject_status_changes=True)
    job_id = submit(ops_client, "resolve", sid, "Fixed the VPN.")
    assert wait_terminal(job_id).state == "verification_failed"
    wait_for(lambda: _alerts(job_id), message="verification alert")
    # someone fixes the ticket by hand in the PSA
    with st.lock:
        st.tickets[9201]["status_id"] = RESOLVED
    calls_before = dict(st.calls)
    out = cli("jobs", "reverify", str(job_id), "--json")
    assert out.returncode == 0, out.stderr
    [result] = json.loads(out.stdout)
    assert result["ok"] and result["state"] == "succeeded" and "without posting" in result["message"]
    j = job(job_id)
    assert j.state == "succeeded" and j.verified_at is not None and j.observed_status_id == RESOLVED
    assert j.result["outcome"] == "verified" and j.result["reverified_by"] == "alice (on call)"
    s = session_row(sid)
    assert (s.status, s.psa_status_id, s.psa_status_name) == ("resolved", RESOLVED, "Resolved")
    assert s.psa_status_verified_at is not None
    # no note posted, no PATCH: one GET of the ticket only
    assert len(st.notes(9201)) == 1 and st.tickets[9201]["patches"] == 1
    assert st.calls["post_note"] == calls_before.get("post_note") and st.calls["get_ticket"] == \
        calls_before["get_ticket"] + 1
    assert _alerts(job_id)[0].resolved_at is not None


def _job_lines(worker, job_id: int, since: int) -> list[str]:
    return [ln for ln in worker.log_text(since).splitlines() if re.search(rf"\bjob_id={job_id}\b", ln)]


def test_reverify_of_a_still_wrong_ticket_keeps_the_failure_unless_reapplied(world, repair_worker, ops_client, cli):
    st = world.sim.state
    mark = repair_worker.mark()
    job_id = submit(ops_client, "resolve", world.session(9301, reject_status_changes=True), "Fixed DNS.")
    assert wait_terminal(job_id).state == "verification_failed"
    # the failure that matters most has its verify line (grep step=verify), at WARNING
    verify = wait_for(lambda: [ln for ln in _job_lines(repair_worker, job_id, mark) if "step=verify" in ln],
                      message="the verify line of the failed verification")
    assert len(verify) == 1 and "WARNING" in verify[0], verify
    assert "status did not verify: expected 9 (Resolved), observed 1 (New)" in verify[0]
    assert "expected_status_id=9 observed_status_id=1" in verify[0]
    still = cli("jobs", "reverify", str(job_id))
    assert still.returncode == 1 and "still shows 1 (New), expected 9" in still.stderr
    assert job(job_id).state == "verification_failed"
    # the board's required field was filled in: PATCH again (the note is not posted twice)
    with st.lock:
        st.tickets[9301]["reject_status_changes"] = False
    mark = repair_worker.mark()
    assert cli("jobs", "reverify", str(job_id), "--reapply").returncode == 0
    j = wait_for(lambda: (x := job(job_id)).state == "succeeded" and x, message="reapplied job verified")
    assert j.observed_status_id == RESOLVED
    assert len(st.notes(9301)) == 1 and st.tickets[9301]["patches"] == 2
    assert [a.action for a in actions(job_id)] == ["reverify", "reapply"]
    # the log says what happened: the note was already there and was not posted again
    lines = wait_for(lambda: (x := _job_lines(repair_worker, job_id, mark)) and any("step=outcome" in ln for ln in x)
                     and x, message="the reapplied execution's lines")
    [post] = [ln for ln in lines if "step=post" in ln]
    note_id = j.note_external_id
    assert f"note {note_id} already on ticket 9301 (an earlier attempt's); not posted again" in post, post
    assert "note posted" not in "\n".join(lines)
    [verified] = [ln for ln in lines if "step=verify" in ln]
    assert "INFO" in verified and "status verified: expected 9 (Resolved), observed 9 (Resolved)" in verified


def test_reverify_refuses_a_deactivated_connection_without_calling_the_psa(world, cli):
    from models import PsaConnection

    st = world.sim.state
    job_id = insert_job(world, 9251, state="verification_failed")
    with session_scope() as db:
        db.execute(update(PsaConnection).where(PsaConnection.id == world.connection_id).values(is_active=False))
    calls_before = dict(st.calls)
    out = cli("jobs", "reverify", str(job_id), "--json")
    assert out.returncode == 1, out.stderr
    [result] = json.loads(out.stdout)
    assert not result["ok"] and result["state"] == "verification_failed"
    assert result["message"] == (f"cannot re-read ticket 9251: PSA connection {world.connection_id} "
                                 "was deactivated after the job was enqueued")
    assert dict(st.calls) == calls_before  # not even a GET
    assert job(job_id).state == "verification_failed" and actions(job_id) == []


def test_cancel_only_touches_queued_or_retrying_jobs(world, cli):
    queued = insert_job(world, 9401)
    retrying = insert_job(world, 9402, state="retrying", next_attempt_at=utcnow() + dt.timedelta(minutes=5))
    running = insert_job(world, 9403, state="running", lease_until=utcnow() + dt.timedelta(minutes=5))
    done = cli("jobs", "cancel", str(queued), "--reason", "customer withdrew")
    assert done.returncode == 0 and job(queued).state == "cancelled"
    assert job(queued).error_message == "cancelled by alice (on call): customer withdrew"
    refused = cli("jobs", "cancel", str(running))
    assert refused.returncode == 1 and "it is running now" in refused.stderr and job(running).state == "running"
    # bulk by filter: a dry run first, then with --yes
    dry = cli("jobs", "cancel", "--ticket", "9402")
    assert dry.returncode == 1 and f"would cancel 1 job(s): {retrying}" in dry.stderr
    assert job(retrying).state == "retrying"
    bulk = cli("jobs", "cancel", "--ticket", "9402", "--yes")
    assert bulk.returncode == 0 and f"[1/1] job {retrying}: cancel ok" in bulk.stderr
    assert job(retrying).state == "cancelled"


def _alerts(job_id: int) -> list[Alert]:
    with session_scope() as db:
        return list(db.scalars(select(Alert).where(Alert.job_id == job_id)))


def test_a_filtered_repair_matching_more_than_the_limit_refuses_instead_of_doing_part(world, cli):
    # given three queued jobs of one account (never published: no worker takes them)
    ids = [insert_job(world, 9601 + i) for i in range(3)]
    # when an operator cancels them by filter with a limit of 2
    out = cli("jobs", "cancel", "--account", str(world.account_id), "--limit", "2", "--yes")
    # then nothing is cancelled and the message says why
    assert out.returncode == 2
    assert "more than 2 jobs match these filters" in out.stderr
    assert [job(i).state for i in ids] == ["queued"] * 3 and all(actions(i) == [] for i in ids)
    # and with a limit that covers them all, all three are cancelled
    out = cli("jobs", "cancel", "--account", str(world.account_id), "--limit", "3", "--yes")
    assert out.returncode == 0, out.stderr
    assert [job(i).state for i in ids] == ["cancelled"] * 3
