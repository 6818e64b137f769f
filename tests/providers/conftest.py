"""Provider tests share one worker per module (the suite's `worker` lives for the whole
session): it stops when its module ends, so it is never running while later modules'
tests count rows on the assumption that no worker is consuming their messages."""
from __future__ import annotations

import pytest

from tests import harness


@pytest.fixture(scope="module")
def worker(worker_env):
    proc = harness.WorkerProcess(worker_env, concurrency=8).start()
    yield proc
    proc.stop()
