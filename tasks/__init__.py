"""Celery tasks and the enqueue API the web tier calls.

Import the enqueue functions from here; importing tasks.writeback pulls in the Celery app.
"""
from tasks.enqueue import (enqueue, enqueue_escalate, enqueue_post_note, enqueue_resolve, enqueue_transition,
                           publish)
from tasks.errors import ConflictError, JobFailed, NotFoundError, RequestError, VerificationFailed

__all__ = ["ConflictError", "JobFailed", "NotFoundError", "RequestError", "VerificationFailed", "enqueue",
           "enqueue_escalate", "enqueue_post_note", "enqueue_resolve", "enqueue_transition", "publish"]
