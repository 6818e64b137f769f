from __future__ import annotations

from celery import Celery

app = Celery("psa_writeback", task_cls="worker.taskbase:Task")  # database errors leave tasks without their text
app.config_from_object("celeryconfig")
# Modules whose tasks this worker serves (one per line: helpers add theirs).
app.conf.include = [
    "tasks.writeback",
    "worker.alerts",  # alert webhook delivery and the stuck-jobs check
    "worker.signals",  # operations hooks: alerts, metrics, structured logs (not a task module)
    "tasks.drafting",
]
