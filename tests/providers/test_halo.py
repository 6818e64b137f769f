"""The HaloPSA provider against its simulator over real HTTP: OAuth2 tokens (cached,
shared, renewed once on a 401, never shown), action visibility and email, paging. The
writeback behaviours common to every PSA are in tests/providers/contract."""
from __future__ import annotations

import logging
import threading

import pytest

from models.enums import NoteVisibility
from providers import errors as E
from providers.halo_tokens import TOKENS
from providers.picklists import PICKLISTS
from providers.simulators.halo import HaloSimulator
from providers.simulators.kits import KITS
from tests.security.recorder import recorder  # noqa: F401  (fixture)


@pytest.fixture()
def halosim():
    TOKENS.clear()
    PICKLISTS.clear()
    server = HaloSimulator().start()
    server.state.add_ticket(1)
    yield server
    server.stop()


def _provider(sim, options=None, **overrides):
    return KITS["halo"].make_provider(sim, options, **overrides)


def test_one_token_serves_every_thread_and_every_provider_instance_of_the_connection(halosim):
    errors: list[BaseException] = []

    def work():
        try:
            _provider(halosim).get_ticket(1)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert halosim.state.calls["tokens_issued"] == 1 and halosim.state.calls["get_ticket"] == 8


def test_an_expired_token_is_renewed_once_on_the_401_and_the_call_goes_through(halosim):
    halo = _provider(halosim)
    halo.get_ticket(1)
    halosim.state.expire_tokens()  # revoked or expired earlier than expires_in said
    assert halo.get_ticket(1).status_id == 1
    assert halosim.state.calls["tokens_issued"] == 2
    assert halosim.state.calls["get_ticket"] == 3  # the refused call, then the one with the new token


def test_a_token_is_renewed_shortly_before_expires_in_without_waiting_for_a_401(halosim):
    halosim.state.token_ttl = 1.0  # renewed at 90% of a short lifetime
    halo = _provider(halosim)
    halo.get_ticket(1)
    import time

    time.sleep(0.95)
    halo.get_ticket(1)
    assert halosim.state.calls["tokens_issued"] == 2 and halosim.state.calls["get_ticket"] == 2  # no 401


def test_a_401_with_a_fresh_token_is_an_auth_error_after_one_renewal(halosim):
    halo = _provider(halosim)
    halo.get_ticket(1)
    halosim.state.add_fault(action="error", status=401, operation="get_ticket", times=2)
    with pytest.raises(E.PsaAuthError):
        halo.get_ticket(1)
    assert halosim.state.calls["tokens_issued"] == 2  # renewed once, not in a loop


def test_wrong_client_secret_is_an_auth_error_that_shows_no_secret_and_no_token(halosim, caplog):
    caplog.set_level(logging.DEBUG)
    good = _provider(halosim)
    good.get_ticket(1)
    [token] = list(halosim.state.tokens)
    with pytest.raises(E.PsaAuthError) as info:
        _provider(halosim, private_key="wrong-fake-secret").get_ticket(1)
    text = str(info.value)
    assert "token endpoint refused the client credentials" in text and "invalid_client" in text
    assert not info.value.retryable
    for shown in (text, caplog.text, repr(good), repr(TOKENS._entries)):
        assert "wrong-fake-secret" not in shown and token not in shown and halosim.state.client_secret not in shown


def test_an_auth_server_on_another_host_never_receives_the_client_secret(halosim, recorder):
    # given an authinfo reply naming another host (a recorder on loopback) as the auth server
    halosim.state.auth_url = f"http://127.0.0.1:{recorder.server_address[1]}/auth"
    # when the provider needs a token
    with pytest.raises(E.PsaPermanentError, match="another host") as err:
        _provider(halosim).get_ticket(1)
    # then the call fails, names no secret, and the other host heard nothing
    assert halosim.state.client_secret not in str(err.value)
    assert recorder.requests == []


def test_the_wrong_tenant_is_refused_at_the_token_endpoint(halosim):
    with pytest.raises(E.PsaAuthError, match="invalid_client"):
        _provider(halosim, company_id="someone-else").get_ticket(1)


def test_a_failing_token_endpoint_is_transient(halosim):
    halosim.state.add_fault(action="error", status=503, operation="token")
    with pytest.raises(E.PsaTransientError):
        _provider(halosim).get_ticket(1)
    assert _provider(halosim).get_ticket(1).id == 1


@pytest.mark.parametrize("visibility,hidden,emails", [
    (NoteVisibility.RESOLUTION, False, False), (NoteVisibility.DISCUSSION, False, False),
    (NoteVisibility.INTERNAL, True, False),
])
def test_actions_are_hidden_from_the_user_only_when_internal_and_never_email_by_default(halosim, visibility,
                                                                                       hidden, emails):
    note = _provider(halosim).post_note(1, "hello", visibility)
    [action] = halosim.state.notes(1)
    assert (action["hiddenfromuser"], action["sendemail"]) == (hidden, emails)
    assert note.id == str(action["id"])
    [read] = _provider(halosim).list_recent_notes(1)
    assert read.visibility is visibility and read.text == "hello"


def test_the_account_may_ask_for_email_on_customer_visible_notes_only(halosim):
    halo = _provider(halosim, {"halo_send_email": True, "halo_outcome_resolution": "Resolved"})
    halo.post_note(1, "visible", NoteVisibility.RESOLUTION)
    halo.post_note(1, "internal", NoteVisibility.INTERNAL)
    assert [(a["sendemail"], a["outcome"]) for a in halosim.state.notes(1)] == [
        (True, "Resolved"), (False, "Private Note")]


def test_notes_after_the_watermark_are_read_across_pages_oldest_first(halosim):
    ids = [halosim.state.add_note(1, f"note {i}") for i in range(250)]
    halo = _provider(halosim)
    newer = halo.list_notes_after(1, str(ids[99]))
    assert [n.id for n in newer] == [str(i) for i in ids[100:]]
    assert halosim.state.calls["list_notes"] == 3  # 100 + 100 + 50
    assert [n.text for n in halo.list_recent_notes(1, 2)] == ["note 249", "note 248"]


def test_a_ticket_without_its_status_name_is_named_from_the_status_list_and_a_429_there_is_raised(halosim):
    # given a Halo that leaves status_name out, whose status list answers 429 once
    halosim.state.omit_status_name = True
    halosim.state.add_fault(action="error", status=429, retry_after=4, operation="list_statuses", times=1)
    halo = _provider(halosim)
    # then the ticket read says so (the runner starts the connection's cooldown), not a
    # nameless ticket read again at once
    with pytest.raises(E.PsaRateLimited):
        halo.get_ticket(1)
    # and afterwards the name comes from the tenant's list
    assert halo.get_ticket(1).status_name == "New"
    # while a list the API user may not read is asked for once, not on every read
    PICKLISTS.clear()
    halosim.state.add_fault(action="error", status=403, operation="list_statuses", times=-1)
    calls = halosim.state.calls["list_statuses"]
    assert [halo.get_ticket(1).status_name for _ in range(3)] == [None] * 3
    assert halosim.state.calls["list_statuses"] == calls + 1


def test_statuses_come_from_the_tenant(halosim):
    statuses = {s.id: (s.name, s.closed) for s in _provider(halosim).list_statuses(0)}
    assert statuses[22] == ("Escalated to 2nd Line", False) and statuses[9] == ("Closed", True)


def test_the_token_cache_is_bounded():
    from providers.halo_tokens import TokenCache

    cache = TokenCache(max_entries=2)
    for i in range(5):
        cache.source(f"conn{i}", lambda: ("t", 60.0)).get()
    assert len(cache) == 2


def test_the_accounts_email_choice_reaches_the_worker(db_clean, halosim, worker):
    from tasks import enqueue_resolve
    from tests.factories import World, wait_terminal

    world = World.create(halosim, prefs={"halo_resolved_status_id": 9, "halo_send_email": True})
    j = wait_terminal(enqueue_resolve(None, world.session(77), "Fixed."))
    assert j.state == "succeeded", j.error_message
    [action] = halosim.state.notes(77)
    assert (action["sendemail"], action["hiddenfromuser"]) == (True, False)


def test_an_oauth_shaped_400_is_an_auth_error_only_from_the_token_endpoint():
    from providers import halo

    body = {"error": "invalid_request", "error_description": "bad\nfield\x1b[31m"}
    assert halo.map_error(400, body, "post_note") is None  # an API 400: the request's fault, no renewal
    err = halo.map_error(400, body, "token")
    assert isinstance(err, E.PsaAuthError) and err.message == "invalid_request (bad field[31m)"
