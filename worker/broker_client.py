"""One Redis client object per kombu channel, instead of one per broker operation.

kombu's Redis channel builds a new `redis.Redis` client in `conn_or_acquire()` for every
operation that is not handed one: each delivered message (QoS.append, the unacked hash),
each ack (QoS.ack) and each flush of the task events Flower reads (the fanout PUBLISH), so
3 to 5 per job. The client object is only a front for the channel's connection pool, and
with redis-py 8 building one costs ~0.2 ms of CPU (its __init__ copies ~200 response
callbacks into a case-insensitive dict): about a twentieth of a worker's CPU per job at zero
PSA latency, spent making objects that hold nothing.

Reusing one client per channel changes no behaviour: a redis-py client without
`single_connection_client` takes a connection from its pool for each command (or pipeline)
and gives it back, so it is safe to share between threads (redis-py's documented guarantee),
and every command still goes through the same pool, with the same settings and key prefix.
The client is tied to the pool it was built on: when kombu replaces the channel's pool (a
reconnect after the broker went away: Channel._disconnect_pools), the next call builds a
new client on the new pool, exactly as before. A client passed in is used as is.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ATTR = "_psa_shared_client"


def reuse_channel_clients() -> None:
    """Install the shared client in kombu's Redis channel (idempotent)."""
    try:
        from kombu.transport import redis as kombu_redis
    except ImportError:  # pragma: no cover - the redis extra is a dependency
        return
    if getattr(kombu_redis.Channel.conn_or_acquire, "_psa_shared", False):
        return

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self.__dict__.get(_ATTR)
        # `_pool` is None once kombu dropped the pool (disconnect): build on its new one.
        if shared is None or shared.connection_pool is not self._pool:
            shared = self._create_client()  # on self.pool, which (re)creates _pool
            self.__dict__[_ATTR] = shared
        yield shared

    conn_or_acquire._psa_shared = True  # type: ignore[attr-defined]
    kombu_redis.Channel.conn_or_acquire = conn_or_acquire
