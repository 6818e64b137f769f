"""Broker housekeeping at worker start: drop the routing that older releases left in Redis.

Before each queue had its own exchange (celeryconfig.task_queues), Celery bound the
`drafting` queue to the default `writeback` exchange with routing key `writeback`, so a
message published to that exchange and key went to both queues. kombu's Redis transport
keeps bindings in Redis sets that outlive the processes that declared them, and its
queue_unbind only edits the in-memory table; so a worker of this release removes the stale
member itself, once at start-up (SREM: harmless when it is not there).
"""
from __future__ import annotations

import logging
from typing import Any

from celery import signals

log = logging.getLogger("psa_writeback.queues")

# (queue, exchange, routing key) bindings older releases declared and this one must not keep.
LEGACY_BINDINGS = (("drafting", "writeback", "writeback"),)


def drop_legacy_bindings(connection: Any) -> int:
    """Remove LEGACY_BINDINGS from a Redis broker; returns how many were there. Other
    transports keep bindings in the declaring process only: nothing to do."""
    if connection.transport.driver_type != "redis":
        return 0
    channel = connection.default_channel
    removed = 0
    with channel.conn_or_acquire() as client:
        for queue, exchange, routing_key in LEGACY_BINDINGS:
            member = channel.sep.join([routing_key, "", queue])
            for key in (channel.keyprefix_queue % exchange, channel.keyprefix_binding_permanent % exchange):
                removed += int(client.srem(key, member) or 0)
    return removed


@signals.worker_ready.connect
def _drop_legacy_bindings(sender: Any = None, **_: Any) -> None:
    try:
        with sender.app.connection_for_write() as conn:
            if drop_legacy_bindings(conn):
                log.info("removed the drafting queue's old binding to the writeback exchange")
    except Exception as err:  # the broker may be away at start-up; routing is only wrong for old publishers
        log.warning("could not check the broker for old queue bindings (%s)", type(err).__name__)
