"""kombu's Redis channel keeps one client per pool (worker.broker_client), against real Redis."""
from __future__ import annotations

import os
import uuid

import redis
from kombu import Connection

import worker.app  # noqa: F401 - installs the shared client
from tests.conftest import BROKER_URL


def _channel():
    conn = Connection(BROKER_URL, transport_options={"global_keyprefix": os.environ["CELERY_REDIS_KEY_PREFIX"]})
    return conn, conn.default_channel


def _acquired(channel):
    with channel.conn_or_acquire() as client:
        return client


def test_a_channel_reuses_one_client_and_keeps_its_key_prefix():
    # given a channel of the broker connection
    conn, channel = _channel()
    try:
        # when it runs two operations without a client of their own
        first, second = _acquired(channel), _acquired(channel)
        # then both ran on the same client, on the channel's pool, with the key prefix
        assert first is second
        assert first.connection_pool is channel.pool
        key = f"broker-client-{uuid.uuid4().hex}"
        first.hset(key, "f", "1")
        raw = redis.Redis.from_url(BROKER_URL)
        try:
            assert raw.hget(os.environ["CELERY_REDIS_KEY_PREFIX"] + key, "f") == b"1"
        finally:
            raw.delete(os.environ["CELERY_REDIS_KEY_PREFIX"] + key)
            raw.close()
    finally:
        conn.release()


def test_a_client_passed_in_is_used_as_is():
    conn, channel = _channel()
    try:
        given = channel._create_client()
        with channel.conn_or_acquire(given) as client:
            assert client is given
    finally:
        conn.release()


def test_a_new_pool_after_a_disconnect_gets_a_new_client():
    # given a channel whose shared client was built
    conn, channel = _channel()
    try:
        before = _acquired(channel)
        # when kombu drops the channel's pools (what a reconnect after a broker loss does)
        channel._disconnect_pools()
        after = _acquired(channel)
        # then the next operation runs on a new client over the new pool, and works
        assert after is not before
        assert after.connection_pool is channel.pool
        assert after.ping()
    finally:
        conn.release()
