"""Celery settings, read from the environment. Lowercase names (Celery >= 4 style).

Delivery choices (shared/reference/celery-reliability.md):
- acks_late + reject_on_worker_lost: a message is only gone once its job row says so;
  a dead worker's message comes back, and the job row's claim makes the repeat harmless.
- prefetch 1: with acks_late, prefetched messages age toward the visibility timeout.
- visibility_timeout (2 h) > the longest retry countdown we ever publish (30 min), so a
  waiting retry is never redelivered early as a duplicate.
- JSON only: tasks are called by name from a web tier that does not import this code.
"""
from __future__ import annotations

import os
from pathlib import Path

from kombu import Exchange, Queue

from models import settings


def _env_int(name: str, default: int) -> int:
    return settings.integer(name, default, positive=True)


def _embedded_broker() -> tuple[str, dict]:
    # No broker configured: a filesystem queue under ./var, shared by the demo's processes.
    var = Path(os.environ.get("PSA_WRITEBACK_VAR", "var")).resolve()
    var.mkdir(mode=0o700, parents=True, exist_ok=True)  # messages name jobs; owner only (models.db.private_dir)
    var.chmod(0o700)
    root = var / "broker"
    for sub in ("out", "processed", "control"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # control_folder: kombu's default is ./control, in whatever directory a process started.
    opts = {"data_folder_in": str(root / "out"), "data_folder_out": str(root / "out"),
            "processed_folder": str(root / "processed"), "control_folder": str(root / "control"),
            "store_processed": False}
    return "filesystem://", opts


broker_url = os.environ.get("CELERY_BROKER_URL", "").strip()
VISIBILITY_TIMEOUT = _env_int("CELERY_VISIBILITY_TIMEOUT", 7200)
if broker_url:
    broker_transport_options = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
        "max_retries": 3,  # bound producer publish retries; the sweeper covers the rest
        # kombu scans for expired unacked messages every interval x throttle seconds (10 x 10
        # by default): scan every 10 s so a dead worker's messages come back soon after the
        # visibility timeout (the sweeper is the safety net either way).
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    if os.environ.get("CELERY_REDIS_KEY_PREFIX"):
        # Lets several deployments (or concurrent test runs) share one Redis database.
        broker_transport_options["global_keyprefix"] = os.environ["CELERY_REDIS_KEY_PREFIX"]
else:
    broker_url, broker_transport_options = _embedded_broker()

# Our own tables are the source of truth; Celery results are not needed.
task_ignore_result = True
result_backend = None

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Threads: each job is ~5 HTTP calls that mostly wait. 2 prefork children would run 2 jobs
# at once; 32 threads run 32 with one process's memory. Override with WORKER_CONCURRENCY.
# Deliberately no `worker_pool` here: Celery lets that setting replace an explicit
# `-P prefork` (it cannot tell it from the flag's default). The pool's default, WORKER_POOL
# or threads, is the worker command's -P default instead (worker/app.py), so flags win.
# `-c N` wins over this setting by itself.
worker_concurrency = _env_int("WORKER_CONCURRENCY", 32)
# Time limits only bite under prefork; under threads, HTTP timeouts and the job lease bound
# an execution (the lease is longer than the hard limit).
task_soft_time_limit = _env_int("TASK_SOFT_TIME_LIMIT", 240)
task_time_limit = _env_int("TASK_TIME_LIMIT", 300)
worker_cancel_long_running_tasks_on_connection_loss = True
broker_connection_retry_on_startup = True
# Keep reconnecting to Redis however long it is away (default: give up after 100 tries and
# exit). Jobs wait in the database meanwhile; the sweeper re-publishes them once it is back.
broker_connection_max_retries = None
broker_channel_error_retry = True

worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

task_default_queue = "writeback"
# Each queue on its own direct exchange and routing key: a publisher naming the writeback
# exchange and key reaches the writeback queue only, never the drafting workers (and the
# other way round). Queue("drafting") alone would be bound to the default exchange.
task_queues = (Queue("writeback", Exchange("writeback", type="direct"), routing_key="writeback"),
               Queue("drafting", Exchange("drafting", type="direct"), routing_key="drafting"))
task_routes = {"writeback.draft_preview": {"queue": "drafting"}}

# Beat's schedule file (when each entry last ran). Celery's default is ./celerybeat-schedule,
# in whatever directory beat was started from, e.g. a checkout. `-s` on the command line wins.
beat_schedule_filename = os.environ.get("CELERY_BEAT_SCHEDULE_FILE", "").strip() or "/tmp/psa-writeback-beat"

beat_schedule = {
    "writeback-sweep": {
        "task": "writeback.sweep",
        "schedule": settings.number("SWEEP_INTERVAL_SECONDS", 15, positive=True),
        "options": {"expires": 60},
    },
    # Stuck-job alerts, alerts a dead worker missed, lost alert-webhook deliveries (worker/alerts.py).
    "writeback-check-stuck": {
        "task": "writeback.check_stuck",
        "schedule": settings.number("STUCK_CHECK_INTERVAL_SECONDS", 60, positive=True),
        "options": {"expires": 120},
    },
}
