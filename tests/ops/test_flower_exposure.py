"""Flower's development mode (no authentication) listens on 127.0.0.1 only, and Flower's
unauthenticated API is never allowed. Flower started for real from the Procfile line."""
from __future__ import annotations

import subprocess
import time

import requests

from tests.harness import free_port, wait_for
from tests.ops.conftest import ROOT, procfile_command, procfile_env


def _env(broker: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in procfile_env(broker).items() if not k.startswith("FLOWER_")}
    return {**base, **extra}


def _launch(env: dict[str, str], *args: str, within: float = 10.0) -> tuple[int | None, str]:
    """Start the flower process; its exit code if it refused within `within` s (None if it
    was still running: then it is stopped), and its output."""
    proc = subprocess.Popen([*procfile_command("flower")[:-1], procfile_command("flower")[-1] + "".join(
        f" {a}" for a in args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=within)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        return None, out


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hexport = local.rsplit(":", 1)
                if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_development_mode_listens_on_loopback_only(ops_broker, tmp_path):
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen(procfile_command("flower"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=_env(ops_broker, FLOWER_INSECURE_DEV="1", PORT=str(port)))
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()[-2000:]
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthcheck", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(up, timeout=30, message="flower on 127.0.0.1")
        time.sleep(0.5)
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, and no IPv4 or IPv6 wildcard
    finally:
        proc.terminate()
        proc.wait(10)
    assert "on 127.0.0.1 only" in (tmp_path / "flower.log").read_text()


def test_development_mode_refuses_any_other_address(ops_broker):
    for env_extra, args in (({"FLOWER_ADDRESS": "0.0.0.0"}, ()), ({}, ("--address=0.0.0.0",)),
                            ({}, ("--address", "192.0.2.2"))):
        code, out = _launch(_env(ops_broker, FLOWER_INSECURE_DEV="1", PORT=str(free_port()), **env_extra), *args)
        assert code == 2, (env_extra, args, out)
        assert "binds to 127.0.0.1 only" in out and "refusing address" in out


def test_the_unauthenticated_api_is_refused_with_or_without_authentication(ops_broker):
    for extra in ({"FLOWER_INSECURE_DEV": "1"}, {"FLOWER_BASIC_AUTH": "ops:fake-test-password"}):
        code, out = _launch(_env(ops_broker, FLOWER_UNAUTHENTICATED_API="true", PORT=str(free_port()), **extra))
        assert code == 2, (extra, out)
        assert "refusing FLOWER_UNAUTHENTICATED_API" in out
