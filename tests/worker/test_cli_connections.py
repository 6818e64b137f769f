"""add-connection, check-connection and simulator for every provider, run as a user runs
them (a subprocess), against the simulators over HTTP."""
from __future__ import annotations

import json
import subprocess
import sys

from sqlalchemy import select

from models import PsaConnection
from models.db import session_scope
from providers.simulators.autotask import AutotaskSimulator
from providers.simulators.halo import HaloSimulator
from tests.harness import free_port
from tests.worker.test_cli import run

import pytest


@pytest.fixture()
def atsim():
    server = AutotaskSimulator().start()
    yield server
    server.stop()


@pytest.fixture()
def halosim():
    server = HaloSimulator().start()
    yield server
    server.stop()


def _connection(conn_id: int) -> PsaConnection:
    with session_scope() as db:
        return db.scalar(select(PsaConnection).where(PsaConnection.id == conn_id))


def test_autotask_connection_finds_its_zone_and_check_lists_the_tenants_statuses(db_clean, atsim):
    st = atsim.state
    env = {"AUTOTASK_INTEGRATION_CODE": st.integration_code, "PSA_PRIVATE_KEY": st.secret}
    added = run("add-connection", "--account", "5", "--provider", "autotask", "--username", st.username,
                "--zone-lookup-url", atsim.zone_lookup_url, "--json", env=env)
    assert added.returncode == 0, added.stderr
    conn_id = json.loads(added.stdout)["connection_id"]
    row = _connection(conn_id)
    assert (row.provider, row.base_url, row.company_id, row.client_id) == (
        "autotask", atsim.base_url, st.zone_name, st.integration_code)
    assert st.secret.encode() not in bytes(row.private_key_encrypted)
    run("set-prefs", "--account", "5", "autotask_resolved_status_id=5", "autotask_escalated_status_id=99")
    checked = run("check-connection", str(conn_id), "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] is True
    assert {"id": 13, "name": "Escalated to Tier 2", "closed": False, "inactive": False} in report["statuses"]
    resolved, escalated = report["targets"]
    assert (resolved["key"], resolved["exists"], resolved["name"]) == ("autotask_resolved_status_id", True, "Complete")
    assert (escalated["exists"], escalated["reason"]) == (False, "status 99 does not exist here: the status change "
                                                                 "would fail at the PSA")
    assert st.calls["post_note"] == st.calls["update_status"] == 0  # read-only
    human = run("check-connection", str(conn_id)).stdout
    assert "OK, the keys work" in human and "Complete  [closed]" in human


def test_an_unknown_autotask_user_is_refused_before_anything_is_stored(db_clean, atsim):
    env = {"AUTOTASK_INTEGRATION_CODE": "FAKE", "PSA_PRIVATE_KEY": "fake-secret"}
    out = run("add-connection", "--account", "5", "--provider", "autotask", "--username", "nobody@example.com",
              "--zone-lookup-url", atsim.zone_lookup_url, env=env)
    assert out.returncode == 2
    assert "could not find the Autotask zone of API user 'nobody@example.com'" in out.stderr
    with session_scope() as db:
        assert db.scalar(select(PsaConnection)) is None


def test_halo_check_names_the_cause_of_rejected_keys_and_shows_no_secret(db_clean, halosim):
    st = halosim.state
    added = run("add-connection", "--account", "6", "--provider", "halo", "--base-url", halosim.base_url,
                "--tenant", st.tenant, "--client-id", st.client_id, "--json",
                env={"PSA_PRIVATE_KEY": "wrong-fake-halo-secret"})
    assert added.returncode == 0, added.stderr
    conn_id = json.loads(added.stdout)["connection_id"]
    out = run("check-connection", str(conn_id))
    assert out.returncode == 1
    assert "FAILED (auth)" in out.stdout and "client id and secret, or the tenant" in out.stdout
    assert "wrong-fake-halo-secret" not in out.stdout + out.stderr


def test_halo_check_lists_statuses_with_a_ticket(db_clean, halosim):
    st = halosim.state
    st.add_ticket(31)
    added = run("add-connection", "--account", "6", "--provider", "halo", "--base-url", halosim.base_url,
                "--tenant", st.tenant, "--client-id", st.client_id, "--json", env={"PSA_PRIVATE_KEY": st.client_secret})
    conn_id = json.loads(added.stdout)["connection_id"]
    report = json.loads(run("check-connection", str(conn_id), "--ticket", "31", "--json").stdout)
    assert report["ok"] and report["ticket"]["status_name"] == "New"
    assert [t["reason"] for t in report["targets"]] == [
        "halo_resolved_status_id is not set: the status change would be skipped",
        "halo_escalated_status_id is not set: the status change would be skipped"]


def test_connectwise_check_needs_a_board_and_says_when_the_host_is_unreachable(db_clean, sim):
    st = sim.state
    st.add_ticket(41)
    env = {"PSA_PUBLIC_KEY": st.public_key, "PSA_PRIVATE_KEY": st.private_key}
    conn_id = json.loads(run("add-connection", "--account", "7", "--base-url", sim.base_url, "--company",
                             st.company_id, "--client-id", st.client_id, "--json", env=env).stdout)["connection_id"]
    usage = json.loads(run("check-connection", str(conn_id), "--json").stdout)
    assert (usage["ok"], usage["cause"]) == (False, "usage") and "--ticket N" in usage["message"]
    report = json.loads(run("check-connection", str(conn_id), "--ticket", "41", "--json").stdout)
    assert report["ok"] and {s["id"] for s in report["statuses"]} == {1, 5, 7, 9, 11}
    dead = f"http://127.0.0.1:{free_port()}/v4_6_release/apis/3.0"
    dead_id = json.loads(run("add-connection", "--account", "7", "--base-url", dead, "--company", st.company_id,
                             "--client-id", st.client_id, "--json", env=env).stdout)["connection_id"]
    gone = run("check-connection", str(dead_id), "--board", "1")
    assert gone.returncode == 1 and "FAILED (unreachable): could not reach 127.0.0.1" in gone.stdout


@pytest.mark.parametrize("provider", ["autotask", "halo"])
def test_the_simulator_command_runs_each_provider(provider):
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "simulator", "--provider", provider, "--port",
                             str(free_port())], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["base_url"].startswith("http://127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(10)


def test_only_a_connection_that_was_never_made_is_called_unreachable():
    from providers import errors as E
    from tasks.connection_check import _cause

    url = "https://psa.example.com/v4_6_release/apis/3.0"
    slow = _cause(E.PsaDeadlineExceeded("no complete reply within 30s", operation="get_ticket"), "connectwise", url, 1)
    waited = _cause(E.PsaTransientError("another thread's token request did not finish in time"), "halo", url, 1)
    assert (slow["cause"], waited["cause"]) == ("deadline", "transient")  # the host answered, slowly
    refused = _cause(E.PsaUnreachable("connection to connectwise failed or was reset"), "connectwise", url, 1)
    assert refused == {"cause": "unreachable", "message": "could not reach psa.example.com (PSA call failed: connection to "
                                                          "connectwise failed or was reset)"}
