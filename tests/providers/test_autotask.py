"""The Autotask provider against its simulator over real HTTP: headers, tenant picklists,
errors, paging. The writeback behaviours common to every PSA are in tests/providers/contract."""
from __future__ import annotations

import threading

import pytest

from models.enums import NoteVisibility
from providers import Credentials, provider_for
from providers import errors as E
from providers.picklists import PICKLISTS
from providers.simulators.autotask import AutotaskSimulator
from providers.simulators.kits import KITS


@pytest.fixture()
def atsim():
    PICKLISTS.clear()
    server = AutotaskSimulator().start()
    server.state.add_ticket(1)
    yield server
    server.stop()


def _provider(sim, options=None, **overrides):
    return KITS["autotask"].make_provider(sim, options, **overrides)


def test_notes_use_the_tenants_publish_and_note_type_ids_found_by_label(atsim, monkeypatch):
    # given a tenant whose "All Autotask Users" is 7 and "Internal Project Team" is 9
    import providers.simulators.autotask as simmod

    monkeypatch.setattr(simmod, "PUBLISH", {7: "All Autotask Users", 9: "Internal Project Team"})
    at = _provider(atsim)
    at.post_note(1, "Customer sees this.", NoteVisibility.RESOLUTION)
    at.post_note(1, "Technicians only.", NoteVisibility.INTERNAL)
    stored = atsim.state.notes(1)
    assert [(n["publish"], n["noteType"]) for n in stored] == [(7, 3), (9, 3)]
    assert all(n["title"] for n in stored)  # always a title: some tenants require one
    # the picklists were read once per entity, then served from the cache
    assert atsim.state.calls["list_statuses"] == 1
    # and read back, each note has the visibility it was posted with
    assert [n.visibility for n in at.list_recent_notes(1)] == [NoteVisibility.INTERNAL, NoteVisibility.RESOLUTION]


def test_account_options_override_the_picklist_lookup(atsim):
    at = _provider(atsim, {"autotask_publish_internal_id": 4, "autotask_note_type_id": 2})
    at.post_note(1, "Co-managed may see this.", NoteVisibility.INTERNAL)
    [note] = atsim.state.notes(1)
    assert (note["publish"], note["noteType"]) == (4, 2)
    assert atsim.state.calls["list_statuses"] == 0  # nothing to look up


def test_a_label_the_tenant_lacks_is_a_permanent_error_naming_the_setting(atsim, monkeypatch):
    import providers.simulators.autotask as simmod

    monkeypatch.setattr(simmod, "PUBLISH", {1: "All Autotask Users", 2: "Techs"})
    with pytest.raises(E.PsaBadRequest, match="no active internal publish value.*set its id in the account"):
        _provider(atsim).post_note(1, "x", NoteVisibility.INTERNAL)
    assert atsim.state.notes(1) == []


def test_sends_the_three_auth_headers_and_wrong_ones_are_an_auth_error(atsim):
    assert _provider(atsim).get_ticket(1).status_id == 1
    with pytest.raises(E.PsaAuthError) as info:
        _provider(atsim, private_key="wrong-fake-secret").get_ticket(1)
    assert "HTTP 401" in str(info.value) and "wrong-fake-secret" not in str(info.value)


def test_status_names_come_from_the_tenant_picklist_and_a_missing_ticket_is_not_found(atsim):
    at = _provider(atsim)
    at.update_status(1, 13)
    t = at.get_ticket(1)
    assert (t.status_id, t.status_name, t.closed) == (13, "Escalated to Tier 2", False)
    statuses = {s.id: (s.name, s.closed) for s in at.list_statuses(0)}
    assert statuses[5] == ("Complete", True) and statuses[1] == ("New", False)
    with pytest.raises(E.PsaNotFound):
        at.get_ticket(404404)


def test_a_failed_picklist_load_is_not_retried_on_every_ticket_read(atsim):
    # given a tenant whose field information answers 403 (the API user may not read it)
    atsim.state.add_fault(action="error", status=403, operation="list_statuses", times=-1)
    at = _provider(atsim)
    # when three tickets are read
    tickets = [at.get_ticket(1) for _ in range(3)]
    # then they carry their status ids without names, and the picklist was asked for once
    assert [(t.status_id, t.status_name) for t in tickets] == [(1, None)] * 3
    assert atsim.state.calls["list_statuses"] == 1
    assert atsim.state.calls["get_ticket"] == 3


def test_a_429_on_the_picklist_is_raised_for_the_cooldown_and_not_remembered(atsim):
    # given the field information answering 429 once (Retry-After 7 s)
    atsim.state.add_fault(action="error", status=429, retry_after=7, operation="list_statuses", times=1)
    at = _provider(atsim)
    # then the ticket read says so (the runner starts the connection's cooldown) ...
    with pytest.raises(E.PsaRateLimited) as info:
        at.get_ticket(1)
    assert info.value.retry_after == 7
    # ... and the next read, after the cooldown, loads the picklist for real
    assert at.get_ticket(1).status_name == "New"
    assert atsim.state.calls["list_statuses"] == 2


def test_a_500_with_an_errors_array_is_a_permanent_business_rule_with_the_vendor_text(atsim):
    rule = "The ticket cannot be completed while it has open to-dos."
    atsim.state.add_fault(action="error", status=500, operation="update_status", body={"errors": [rule]})
    with pytest.raises(E.PsaBusinessRuleError) as info:
        _provider(atsim).update_status(1, 5)
    assert not info.value.retryable and rule in str(info.value) and "HTTP 500" in str(info.value)


def test_a_bare_500_stays_transient():
    assert E.from_response(500, {}, provider="autotask").retryable is True
    assert E.from_response(500, "Internal Server Error", provider="autotask").retryable is True
    # and the shared mapping (ConnectWise) never reads an errors array as permanent
    assert E.from_response(500, {"errors": ["x"]}, provider="connectwise").retryable is True


def test_a_fourth_concurrent_request_is_refused_as_rate_limited(atsim):
    atsim.state.add_fault(action="delay", operation="get_ticket", seconds=0.6, times=3)
    errors: list[BaseException] = []

    def read():
        try:
            _provider(atsim).get_ticket(1)
        except E.PsaError as err:
            errors.append(err)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    import time

    time.sleep(0.3)
    read()  # the fourth while three are in flight
    for t in threads:
        t.join()
    [err] = errors
    assert isinstance(err, E.PsaRateLimited) and "Thread threshold" in str(err)


def test_list_notes_after_pages_forward_by_id_and_reads_every_newer_note(atsim):
    ids = [atsim.state.add_note(1, f"note {i}") for i in range(1234)]
    at = _provider(atsim)
    newer = at.list_notes_after(1, str(ids[99]))
    assert [n.id for n in newer] == [str(i) for i in ids[100:]]
    assert atsim.state.calls["list_notes"] == 3  # 500 + 500 + 134
    assert [n.text for n in at.list_recent_notes(1, 2)] == ["note 1233", "note 1232"]
    with pytest.raises(ValueError, match="integers"):
        at.list_notes_after(1, "abc")


def test_the_picklist_cache_is_bounded():
    from providers.picklists import Picklist, PicklistCache

    cache = PicklistCache(max_entries=3)
    for i in range(10):
        cache.get(f"tenant{i}", lambda: {"status": Picklist("s", {1: ("New", True)})}, "status")
    assert len(cache) == 3


def test_registered_with_its_preference_prefix():
    from providers import REGISTRY

    assert REGISTRY["autotask"].preference_prefix == "autotask"
    assert provider_for("autotask", Credentials("http://127.0.0.1:1/ATServicesRest/V1.0", "", "c", "u", "s"))


def test_the_accounts_picklist_overrides_reach_the_worker(db_clean, atsim, worker):
    # given an account that wants escalations visible to co-managed users (publish 4)
    from tasks import enqueue_escalate
    from tests.factories import World, wait_terminal

    world = World.create(atsim, prefs={"autotask_escalated_status_id": 13, "autotask_publish_internal_id": 4})
    sid = world.session(77)
    j = wait_terminal(enqueue_escalate(None, sid, "## Problem\nDisk full."))
    assert j.state == "succeeded", j.error_message
    [note] = atsim.state.notes(77)
    assert note["publish"] == 4 and atsim.state.status_of(77) == 13


def test_vendor_strings_are_cleaned_and_malformed_ids_are_protocol_errors():
    from providers import autotask
    from providers.values import vendor_id

    err = autotask.map_error(500, {"errors": ["Line one\nforged: line\x1b[2J", 7]})
    assert isinstance(err, E.PsaBusinessRuleError) and "\n" not in err.message and "\x1b" not in err.message
    assert autotask.map_error(500, {"errors": []}) is None  # a bare 500 stays transient
    for bad in ("abc", 1.5e400, True, None):
        with pytest.raises(E.PsaProtocolError):
            vendor_id(bad, "note reply", "post_note")
