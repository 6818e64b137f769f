from __future__ import annotations

from celery import Celery

app = Celery("psa_writeback")
app.config_from_object("celeryconfig")
app.conf.include = ["tasks.writeback"]
