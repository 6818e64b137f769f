"""The worker's metrics in prometheus_client multiprocess mode, for a pool with children
(WORKER_POOL=prefork). Its own module: no other worker may consume its jobs meanwhile."""
from __future__ import annotations

import os
import re
from pathlib import Path

from tests import harness
from tests.factories import wait_terminal
from tests.harness import free_port, wait_for
from tests.ops.conftest import ops_env, submit
from tests.ops.test_metrics import scrape, total, value


def test_prefork_worker_merges_its_children_in_multiprocess_mode(world, ops_broker, ops_client, tmp_path):
    # given a worker with child processes and a shared multiprocess directory
    port, mp_dir = free_port(), tmp_path / "prom"
    mp_dir.mkdir()
    (mp_dir / "counter_99999.db").write_bytes(b"stale")  # a previous run's file must not be merged
    proc = harness.WorkerProcess(ops_env(ops_broker, METRICS_PORT=str(port), PROMETHEUS_MULTIPROC_DIR=str(mp_dir)),
                                 pool="prefork", concurrency=2, log_path=tmp_path / "prefork.log").start()
    try:
        ids = [submit(ops_client, "resolve", world.session(7200 + n), f"Note {n}.") for n in range(4)]
        assert {wait_terminal(j).state for j in ids} == {"succeeded"}
        # then the parent's endpoint sums what every child counted
        s = wait_for(lambda: (x := scrape(port)) and total(x, "psa_writeback_writebacks_total") == 4 and x,
                     message="four writebacks across children")
        assert value(s, "psa_writeback_psa_request_duration_seconds_count", provider="connectwise",
                     operation="post_note") == 4
        assert re.search(r"counter_\d+\.db", " ".join(os.listdir(mp_dir)))  # samples went through the files
    finally:
        proc.stop()
    assert Path(mp_dir / "counter_99999.db").exists() is False
