"""`celery -A worker worker` takes its pool and concurrency from the command line when given
(every Celery operator's habit), and from WORKER_POOL / WORKER_CONCURRENCY otherwise. Real
worker processes, each on a queue of its own so they take no other test's messages."""
from __future__ import annotations

import re
import uuid

import pytest

from tests import harness


def _banner(env_overrides: dict[str, str | None], tmp_path, **opts) -> tuple[str, int]:
    """Start a worker, return its banner's concurrency line and its number of child processes."""
    import os

    env = dict(os.environ)
    for name, value in env_overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    w = harness.WorkerProcess(env, queues=f"pool-flags-{uuid.uuid4().hex[:8]}",
                              log_path=tmp_path / f"{uuid.uuid4().hex[:6]}.log", **opts).start()
    try:
        line = re.search(r"concurrency: (.+)", w.log_text())
        assert line, w.log_text()[-2000:]
        return line.group(1).strip(), len(w.children())
    finally:
        w.stop()


@pytest.mark.parametrize("env_pool", ["threads", "solo"])
def test_command_line_pool_and_concurrency_win_over_the_environment(tmp_path, env_pool):
    banner, children = _banner({"WORKER_POOL": env_pool, "WORKER_CONCURRENCY": "5"}, tmp_path,
                               pool="prefork", concurrency=2)
    assert banner == "2 (prefork)"
    assert children == 2  # two pool processes really run


def test_without_flags_the_environment_decides(tmp_path):
    assert _banner({"WORKER_POOL": "prefork", "WORKER_CONCURRENCY": "2"}, tmp_path, pool=None,
                   concurrency=None) == ("2 (prefork)", 2)
    banner, children = _banner({"WORKER_POOL": "threads", "WORKER_CONCURRENCY": "3"}, tmp_path, pool=None,
                               concurrency=None)
    assert (banner, children) == ("3 (thread)", 0)


def test_without_flags_or_environment_the_default_is_32_threads(tmp_path):
    assert _banner({"WORKER_POOL": None, "WORKER_CONCURRENCY": None}, tmp_path, pool=None,
                   concurrency=None) == ("32 (thread)", 0)


def test_command_line_threads_win_over_a_prefork_environment(tmp_path):
    assert _banner({"WORKER_POOL": "prefork", "WORKER_CONCURRENCY": "2"}, tmp_path, pool="threads",
                   concurrency=4) == ("4 (thread)", 0)
