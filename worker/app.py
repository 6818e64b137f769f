from __future__ import annotations

from celery import Celery

app = Celery("psa_writeback")
app.config_from_object("celeryconfig")
# Modules whose tasks this worker serves (one per line: helpers add theirs).
app.conf.include = [
    "tasks.writeback",
    "tasks.drafting",
]
