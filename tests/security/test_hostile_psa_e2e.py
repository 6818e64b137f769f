"""A hostile tenant PSA through the real worker (issue 11 §1-2): its jobs fail with the limit
named, the worker's memory stays put, and other tenants' jobs are unaffected."""
from __future__ import annotations

from models.db import session_scope
from tasks import admin, enqueue_resolve
from tests.factories import RESOLVED, attempts, wait_terminal
from tests.security.hostile import HostileServer, gzip_bomb, json_reply, send


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _tenant(account_id: int, server: HostileServer, ticket_id: int) -> int:
    """An account whose PSA connection is `server`, and a session on one of its tickets."""
    with session_scope() as db:
        conn = admin.add_connection(db, account_id=account_id, provider="connectwise",
                                    base_url=server.url + "/v4_6_release/apis/3.0", company_id="evil",
                                    client_id="fake-client-id-evil", public_key="fake-pub", private_key="fake-priv")
        admin.set_preferences(db, account_id, {"cw_resolved_status_id": RESOLVED})
        return admin.create_session(db, account_id=account_id, psa_connection_id=conn.id,
                                    psa_ticket_id=ticket_id).id


def test_a_hostile_psa_fails_its_own_jobs_with_the_limit_named_and_other_tenants_run(world, worker, hostile):
    bomb = hostile(lambda h: send(h, 200, gzip_bomb(300), {"Content-Encoding": "gzip"}))
    catcher = hostile(json_reply(201, {"id": 1, "text": "stolen"}))

    def redirect_posts(h):  # lists notes like a PSA, then redirects the note's POST elsewhere
        if h.command == "POST":
            send(h, 307, b"", {"Location": catcher.url + "/v4_6_release/apis/3.0/service/tickets/7/notes"})
        else:
            send(h, 200, b"[]")

    redirector = hostile(redirect_posts)
    bomb_sid, redirect_sid = _tenant(2, bomb, 7), _tenant(3, redirector, 7)
    good_sids = [world.session(9100 + i) for i in range(3)]
    peak_before = _peak_rss_mb(worker.proc.pid)

    bomb_job = enqueue_resolve(None, bomb_sid, "Bomb tenant's note.")
    redirect_job = enqueue_resolve(None, redirect_sid, "Customer-visible note for the redirecting tenant.")
    good_jobs = [enqueue_resolve(None, sid, f"Fixed it ({sid}).") for sid in good_sids]

    j = wait_terminal(bomb_job)
    assert j.state == "failed" and j.attempts == 1 and j.error_type == "PsaResponseTooLarge"
    assert "PSA_MAX_RESPONSE_BYTES" in j.error_message
    j = wait_terminal(redirect_job)
    assert j.state == "failed" and j.attempts == 1 and j.error_type == "PsaRedirectRefused"
    assert "HTTP 307" in j.error_message and catcher.url not in j.error_message
    assert catcher.seen == []  # neither the note body nor the clientId went to the other host
    assert [r["method"] for r in redirector.seen] == ["GET", "POST"]
    for job_id in good_jobs:
        assert wait_terminal(job_id).state == "succeeded"
    assert all(world.sim.state.status_of(9100 + i) == RESOLVED for i in range(3))
    # Inflating the 300 MiB bomb would have raised the worker's peak memory by that much.
    assert _peak_rss_mb(worker.proc.pid) - peak_before < 100


def test_a_post_whose_reply_dribbles_past_the_deadline_is_reconciled_not_posted_twice(world, worker):
    # The suite's worker: PSA_CONNECT_TIMEOUT 5 + PSA_READ_TIMEOUT 3 = an 8 s call deadline.
    sid = world.session(9200)
    world.sim.state.add_fault(action="dribble_after_apply", operation="post_note", seconds=0.5, ticket_id=9200)
    j = wait_terminal(enqueue_resolve(None, sid, "Replaced the PSU."), timeout=60)
    assert j.state == "succeeded", j.error_message
    assert j.result["note"]["adopted"] is True  # the cut POST had landed: found, not re-posted
    assert len(world.sim.state.notes(9200)) == 1
    first = attempts(j.id)[0]
    assert first.error_type == "PsaDeadlineExceeded" and "PSA_CALL_DEADLINE_SECONDS" in first.error_message
    # Cut at the deadline, not after the ~150 s the reply would take one byte per 0.5 s.
    assert first.duration_ms < (8 + 3) * 1000, first.duration_ms


def test_a_connection_to_a_refused_address_fails_without_a_call(world, worker, hostile, monkeypatch):
    # The worker allows loopback by IP address (the harness's PSA_ALLOWED_HOSTS), so point a
    # connection at a private address it does not allow. Added with this process allowing it
    # (as if the row had been written some other way); the worker refuses it when connecting.
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "10.0.0.0/8")
    with session_scope() as db:
        conn = admin.add_connection(db, account_id=4, provider="connectwise", base_url="https://10.255.0.5/apis/3.0",
                                    company_id="evil", client_id="fake-client", public_key="fake-pub",
                                    private_key="fake-priv")
        admin.set_preferences(db, 4, {"cw_resolved_status_id": RESOLVED})
        sid = admin.create_session(db, account_id=4, psa_connection_id=conn.id, psa_ticket_id=7).id
    j = wait_terminal(enqueue_resolve(None, sid, "Note for a private host."))
    assert j.state == "failed" and j.attempts == 1 and j.error_type == "PsaUnsafeDestination"
    assert "10.255.0.5 is a private address" in j.error_message and "PSA_ALLOWED_HOSTS" in j.error_message
    assert attempts(j.id)[0].duration_ms < 2000  # refused before any connect attempt
