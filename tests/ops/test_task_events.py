"""Flower's task events, sent in batches by the worker (worker.task_events): every event of
every task still arrives, in order, and a worker that stops sends what it had buffered."""
from __future__ import annotations

import ast
import threading
import time
import uuid

import redis

from tasks import enqueue_resolve
from tests import harness
from tests.factories import wait_terminal
from tests.harness import TaskEvents, wait_for
from worker.app import app

_LIFE = ["task-received", "task-started", "task-succeeded"]


def _events(env: dict[str, str]) -> TaskEvents:
    return TaskEvents(env["CELERY_BROKER_URL"], {"global_keyprefix": env["CELERY_REDIS_KEY_PREFIX"]}).start()


def _task_ids(events: TaskEvents, job_ids: list[int]) -> dict[int, str]:
    found = {}
    for e in events.snapshot():
        if e["type"] == "task-received":
            job_id = ast.literal_eval(e.get("kwargs") or "{}").get("job_id")
            if job_id in job_ids:
                found[job_id] = e["uuid"]
    return found


def _life(events: TaskEvents, task_id: str) -> list[dict]:
    """The worker's events of a task (not the publisher's task-sent)."""
    return [e for e in events.of(task_id) if e["type"] in _LIFE]


def _all(found, n: int):
    return found if len(found) == n else None


class _MultiCount:
    """How many `task.multi` messages reach Redis (what the worker published, not split)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.count = 0
        self._client = redis.Redis.from_url(env["CELERY_BROKER_URL"])
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"{env['CELERY_REDIS_KEY_PREFIX']}*celeryev/task.multi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._pubsub.get_message(timeout=0.1) is not None:
                self.count += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


def test_every_task_event_arrives_in_order_in_fewer_messages(world, worker_env):
    # given a worker, a listener as Flower is one, and a count of the messages on the wire
    w = harness.WorkerProcess(worker_env, concurrency=8).start()
    events, wire = _events(worker_env), _MultiCount(worker_env)
    try:
        # when a batch of jobs runs
        jobs = [enqueue_resolve(None, world.session(3600 + i), f"Fixed {i}.") for i in range(12)]
        for job_id in jobs:
            assert wait_terminal(job_id).state == "succeeded"
        tasks = wait_for(lambda: _all(_task_ids(events, jobs), len(jobs)), timeout=30, message="every task-received")
        # then each task's events all arrive, in the order they happened
        for task_id in tasks.values():
            life = wait_for(lambda t=task_id: _all(_life(events, t), 3), timeout=30, message="its three events")
            assert [e["type"] for e in sorted(life, key=lambda e: e["clock"])] == _LIFE
        # and the worker sent them in batches: fewer messages than events
        assert 0 < wire.count < 3 * len(jobs)
    finally:
        wire.stop()
        events.stop()
        w.stop()


def test_a_stopping_worker_sends_the_events_it_buffered(db_clean, worker_env):
    # given a worker that would hold its task events for a minute, alone on a queue of its own
    # (the suite's worker, if one is running, serves the writeback queue)
    env = {**worker_env, "TASK_EVENTS_FLUSH_SECONDS": "60"}
    queue = f"events-test-{uuid.uuid4().hex[:8]}"
    w = harness.WorkerProcess(env, concurrency=2, queues=queue).start()
    events = _events(env)
    try:
        task_id = app.send_task("writeback.sweep", queue=queue).id
        wait_for(lambda: f"writeback.sweep[{task_id}] succeeded" in w.log_text(), timeout=30, message="the task ran")
        time.sleep(0.5)
        assert _life(events, task_id) == []  # still in the worker's buffer
        # when the worker stops (warm shutdown)
        w.stop()
        # then the task's events arrive all the same, in order
        life = wait_for(lambda: _all(_life(events, task_id), 3), timeout=15, message="its three events")
        assert [e["type"] for e in sorted(life, key=lambda e: e["clock"])] == _LIFE
    finally:
        events.stop()
        w.stop()
