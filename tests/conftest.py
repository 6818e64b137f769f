"""Fixtures: real PostgreSQL, real Redis, a real worker process, the simulator over HTTP.

Environment is set before anything imports celeryconfig, so this process (the publisher)
and the worker subprocess agree on broker and database.
"""
from __future__ import annotations

import os

import pytest
import redis

from tests import harness

_REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "11"))
BROKER_URL = f"{harness.REDIS_BASE}/{_REDIS_DB}"
DATABASE_URL = harness.create_database()
os.environ.update(harness.TEST_ENV)
os.environ["DATABASE_URL"] = DATABASE_URL
os.environ["CELERY_BROKER_URL"] = BROKER_URL
# Concurrent test runs share the Redis database; a per-run key prefix keeps their queues apart.
os.environ["CELERY_REDIS_KEY_PREFIX"] = f"pswb-test-{os.getpid()}:"

from models.db import get_engine  # noqa: E402
from models.migrate import upgrade  # noqa: E402


def _xdist_controller(config: pytest.Config) -> bool:
    """True in the pytest-xdist process that only hands tests out (`-n N`, N > 0): it runs
    none, so it needs no schema. Each xdist worker is a process of its own and so gets its
    own database and key prefix above; `-n 0` runs everything here, serially."""
    return config.pluginmanager.hasplugin("dsession")  # xdist registers it in the controller only


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _xdist_controller(session.config):
        upgrade(DATABASE_URL)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    client = redis.Redis.from_url(BROKER_URL)
    for key in client.scan_iter(match=os.environ["CELERY_REDIS_KEY_PREFIX"] + "*", count=1000):
        client.delete(key)
    get_engine().dispose()
    harness.drop_database(DATABASE_URL)


@pytest.fixture(scope="session")
def worker_env() -> dict[str, str]:
    return dict(os.environ)


@pytest.fixture(scope="session")
def worker(worker_env):
    """One threads-pool worker for the suite; tests that kill workers start their own."""
    proc = harness.WorkerProcess(worker_env, concurrency=8).start()
    yield proc
    proc.stop()


@pytest.fixture()
def db_clean():
    harness.truncate_all(get_engine())
    yield


@pytest.fixture()
def sim():
    from providers.simulators.connectwise import SimulatorServer

    server = SimulatorServer().start()
    yield server
    server.stop()


@pytest.fixture()
def world(db_clean, sim):
    """An account with a ConnectWise connection to the simulator and status preferences."""
    from tests.factories import World

    return World.create(sim)


@pytest.fixture()
def task_events(worker):
    """Task events as Flower sees them, from the suite's worker."""
    from tests.harness import TaskEvents

    events = TaskEvents(worker.env["CELERY_BROKER_URL"],
                        {"global_keyprefix": worker.env["CELERY_REDIS_KEY_PREFIX"]}).start()
    yield events
    events.stop()
