"""Thousands of tenants leave no Redis keys behind (issue 14): every per-connection key the
rate limiter writes (bucket, cooldown, in-flight set) carries an expiry, so an idle tenant's
keys go by themselves. Real Redis."""
from __future__ import annotations

import os
import time
import uuid

import redis

from tasks import ratelimit

CONNECTIONS = 2000


def test_every_limiter_key_expires_when_its_connection_goes_idle(monkeypatch):
    monkeypatch.setenv("PSA_RATE_LIMIT_PER_SECOND", "50")
    monkeypatch.setenv("PSA_RATE_LIMIT_BURST", "10")  # the bucket key lives burst/rate + 1 s = 1.2 s
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "2")
    client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    tag = f"tenants-{uuid.uuid4().hex[:8]}"
    pattern = ratelimit._key("*", f"{tag}-*")
    # given a run over many connections: each passes the gate for a job (tokens + an in-flight
    # slot held for at most 1 s), some jobs end and give the slot back, some leave it held
    # (a worker that died mid-job), some connections answer 429 (a cooldown), some are full
    for n in range(CONNECTIONS):
        connection = f"{tag}-{n}"
        with ratelimit.counting_against(connection, 5, token=f"job-{n}-a", hold=1.0):
            ratelimit.gate("connectwise", "get_ticket")
            if n % 3 == 0:  # a second job while the first still runs
                assert ratelimit.admit(connection, 5, f"job-{n}-b", 1.0)[0] == "go"
                assert ratelimit.admit(connection, 5, f"job-{n}-c", 1.0)[0] == "full"  # over the cap of 2
        if n % 7 == 0:
            ratelimit.start_cooldown(connection, 1.0)
            assert ratelimit.admit(connection, 5, f"job-{n}-d", 1.0)[0] == "cooldown"
    # then every key it left has an expiry: none without one (PTTL -1)
    keys = list(client.scan_iter(match=pattern, count=1000))
    kinds = {key.decode().split("psa-writeback:")[1].split(":")[0] for key in keys}
    assert kinds == {"bucket", "inflight", "cooldown"}, kinds
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    ttls = pipe.execute()
    # (-2: expired between the scan and the PTTL, which is fine; -1 would be a key kept for ever)
    assert [k for k, ttl in zip(keys, ttls) if ttl == -1] == []
    assert max(ttls) <= 2_100  # none outlives its connection's last use by more than hold/cooldown + 1 s
    print(f"\nkeys after {CONNECTIONS} connections: {len(keys)}; longest expiry {max(ttls)} ms")
    # and once the connections are idle for that long, none is left
    time.sleep(max(ttls) / 1000 + 0.2)
    left = list(client.scan_iter(match=pattern, count=1000))
    print(f"keys {max(ttls) / 1000 + 0.2:.1f} s later: {len(left)}")
    assert left == []
