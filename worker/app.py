from __future__ import annotations

import os

from celery import Celery

from worker.broker_client import reuse_channel_clients
from worker.task_events import BatchedTaskEvents

reuse_channel_clients()  # one Redis client per kombu channel, not one per ack or event flush
app = Celery("psa_writeback", task_cls="worker.taskbase:Task")  # database errors leave tasks without their text
app.config_from_object("celeryconfig")
app.steps["consumer"].add(BatchedTaskEvents)  # Flower's task events in batches, every 0.1 s
# Modules whose tasks this worker serves (one per line: helpers add theirs).
app.conf.include = [
    "tasks.writeback",
    "worker.alerts",  # alert webhook delivery and the stuck-jobs check
    "worker.signals",  # operations hooks: alerts, metrics, structured logs (not a task module)
    "tasks.drafting",
    "worker.queues",  # drops queue bindings older releases left in Redis (not a task module)
]


def default_pool() -> str:
    """The pool `celery -A worker worker` runs when the command line names none."""
    return os.environ.get("WORKER_POOL", "").strip() or "threads"


def _pool_flag_defaults_to_env() -> None:
    """Make WORKER_POOL the default of the worker command's -P, instead of a `worker_pool`
    setting. Celery's -P defaults to "prefork", and its option type cannot tell that default
    from an explicit `-P prefork`, so it lets a configured worker_pool win over both: with
    the setting, `-P prefork -c 2` silently ran as 2 threads. A default changes nothing the
    operator typed (click: command line, then CELERY_WORKER_POOL, then this default), and it
    is read when the command line is parsed, which is after `-A worker` imported this module."""
    from celery.bin.worker import worker as worker_command

    for param in worker_command.params:
        if param.name == "pool":
            param.default = default_pool


_pool_flag_defaults_to_env()
