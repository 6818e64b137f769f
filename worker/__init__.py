"""The Celery app: `celery -A worker worker`. Settings live in celeryconfig.py."""
from worker.app import app

celery = app  # `celery -A worker` looks for `app` or `celery`

__all__ = ["app", "celery"]
