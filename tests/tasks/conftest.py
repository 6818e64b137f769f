"""Fixtures shared by the tests of tasks/."""
from __future__ import annotations

import os
import uuid

import pytest
import redis

from tasks import ratelimit


@pytest.fixture()
def limiter_keys():
    """Connection keys of the test's own; whatever the limiter leaves under them in Redis
    (cooldown, bucket, in-flight set, hourly count, waiting set) is removed after it."""
    made: list[str] = []

    def new() -> str:
        made.append(f"test-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    for key in made:
        client.delete(*(ratelimit._key(kind, key) for kind in ("cooldown", "bucket", "inflight", "hourly", "waiting")))
