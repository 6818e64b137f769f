"""Routing on a real Redis broker: each queue has its own exchange and routing key, so a
publisher naming the writeback exchange and key reaches the writeback queue only."""
from __future__ import annotations

import uuid

import pytest
from kombu import Connection, Exchange, Producer, Queue

from tests.conftest import BROKER_URL
from worker.app import app
from worker.queues import drop_legacy_bindings


@pytest.fixture()
def broker():
    """A kombu connection with a key prefix of its own: the suite's worker never sees it."""
    prefix = f"pswb-routing-{uuid.uuid4().hex[:8]}:"
    conn = Connection(BROKER_URL, transport_options={"global_keyprefix": prefix})
    yield conn
    client = conn.default_channel.client
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    conn.release()


def _declare_configured_queues(conn: Connection) -> dict[str, Queue]:
    # What a worker consuming both queues declares: Celery's Queues, defaults applied.
    queues = {name: q.bind(conn.default_channel) for name, q in app.amqp.queues.items()}
    for q in queues.values():
        q.declare()
    return queues


def _depth(conn: Connection, name: str) -> int:
    return conn.default_channel._size(name)  # every priority list of the queue, prefix applied


def _publish(conn: Connection, exchange: str, routing_key: str) -> None:
    Producer(conn.default_channel).publish({"probe": 1}, exchange=exchange, routing_key=routing_key,
                                           serializer="json")


def test_the_writeback_exchange_and_key_reach_the_writeback_queue_only(broker):
    queues = _declare_configured_queues(broker)
    assert {"writeback", "drafting"} <= set(queues)
    _publish(broker, "writeback", "writeback")
    assert (_depth(broker, "writeback"), _depth(broker, "drafting")) == (1, 0)
    _publish(broker, queues["drafting"].exchange.name, queues["drafting"].routing_key)
    assert (_depth(broker, "writeback"), _depth(broker, "drafting")) == (1, 1)
    assert queues["drafting"].exchange.name != "writeback" and queues["drafting"].routing_key != "writeback"


def test_a_worker_removes_the_binding_an_older_release_left_in_redis(broker):
    # Given the old declaration: drafting bound to the writeback exchange with key writeback
    Queue("drafting", Exchange("writeback", type="direct"), routing_key="writeback").bind(
        broker.default_channel).declare()
    _declare_configured_queues(broker)
    _publish(broker, "writeback", "writeback")
    assert _depth(broker, "drafting") == 1  # the stale binding still routes there
    # When a worker of this release starts (the worker_ready hook calls this)
    assert drop_legacy_bindings(broker) >= 1
    # Then the writeback exchange reaches the writeback queue only; running it again is harmless
    broker.default_channel.queue_purge("drafting")
    _publish(broker, "writeback", "writeback")
    assert (_depth(broker, "writeback"), _depth(broker, "drafting")) == (2, 0)
    assert drop_legacy_bindings(broker) == 0
