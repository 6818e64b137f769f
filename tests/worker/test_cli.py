"""The CLI as a user runs it (a subprocess), and the demo on its embedded defaults."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.factories import wait_terminal

CLI = [sys.executable, "-m", "worker.cli"]


def run(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, env={**os.environ, **(env or {})}, input=input,
                          cwd=cwd or Path(__file__).resolve().parents[2], timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_setup_enqueue_and_inspect_through_the_cli(db_clean, sim, worker):
    st = sim.state
    st.add_ticket(7001)
    assert run("migrate").returncode == 0
    added = run("add-connection", "--account", "3", "--base-url", sim.base_url, "--company", st.company_id,
                "--client-id", st.client_id, "--json",
                env={"PSA_PUBLIC_KEY": st.public_key, "PSA_PRIVATE_KEY": st.private_key})
    assert added.returncode == 0, added.stderr
    conn_id = json.loads(added.stdout)["connection_id"]
    prefs = run("set-prefs", "--account", "3", "cw_resolved_status_id=9", "--json")
    assert json.loads(prefs.stdout)["preferences"] == {"cw_resolved_status_id": 9}
    sess = run("create-session", "--account", "3", "--connection", str(conn_id), "--ticket", "7001", "--json")
    sid = json.loads(sess.stdout)["session_id"]
    enq = run("enqueue", "resolve", "--session", str(sid), "--markdown-file", "-", "--json",
              input="Rebooted the **switch**.".encode())
    assert enq.returncode == 0, enq.stderr
    job_id = json.loads(enq.stdout)["job_id"]
    assert wait_terminal(job_id).state == "succeeded"

    shown = json.loads(run("jobs", "show", str(job_id), "--json").stdout)
    assert shown["state"] == "succeeded" and shown["ticket_id"] == 7001
    assert shown["attempt_history"][0]["outcome"] == "succeeded"
    listed = json.loads(run("jobs", "list", "--ticket", "7001", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]
    human = run("jobs", "show", str(job_id)).stdout
    assert "succeeded" in human and "outcome" in human  # the attempt table header


def test_cli_refuses_bad_input_with_a_clear_message(db_clean):
    missing_key = run("add-connection", "--account", "3", "--base-url", "https://x.example", "--company", "c",
                      "--client-id", "i", env={"PSA_PUBLIC_KEY": "", "PSA_PRIVATE_KEY": ""})
    assert missing_key.returncode == 2
    assert "set the environment variable PSA_PUBLIC_KEY" in missing_key.stderr
    unknown = run("enqueue", "resolve", "--session", "424242", "--markdown", "x", "--json")
    assert unknown.returncode == 2
    assert json.loads(unknown.stdout) == {"error": "not_found", "message": "unknown session 424242"}
    sid = json.loads(run("create-session", "--account", "3", "--json").stdout)["session_id"]
    bad_utf8 = run("enqueue", "resolve", "--session", str(sid), "--markdown-file", "-", input=b"\xff\xfe bad")
    assert bad_utf8.returncode == 2 and "not valid UTF-8" in bad_utf8.stderr
    bad_url = run("add-connection", "--account", "3", "--base-url", "ftp://x", "--company", "c", "--client-id", "i",
                  env={"PSA_PUBLIC_KEY": "a", "PSA_PRIVATE_KEY": "b"})
    assert bad_url.returncode == 2 and "base_url must be an https:// URL" in bad_url.stderr


def test_demo_runs_on_the_embedded_defaults(tmp_path):
    # A newcomer's machine: no database, no broker, no key configured.
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "PSA_WRITEBACK_ENCRYPTION_KEYS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([*CLI, "demo"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "sqlite" in out and "filesystem (embedded)" in out
    assert out.count("as expected") == 7  # five on ConnectWise, one resolve on each other PSA
    assert "resolve on autotask" in out and "resolve on halo" in out
    assert "verification_failed" in out and "demo OK" in out
    assert (tmp_path / "var" / "psa-writeback.db").exists()
