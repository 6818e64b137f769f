"""The base class of every task of this app: a database error never leaves a task as is.

An error from the driver quotes values (PostgreSQL's DETAIL: "Failing row contains (...)",
note markdown included), and Celery copies an escaping exception's repr and traceback into
the ERROR log line, the result backend and Flower's task-failed event. So an escaping
database error is replaced by DatabaseFailure, which names its type, SQLSTATE and the line
that raised it, and nothing of its text. (The writeback tasks handle their own database
errors first; this is the guard for every task.)
"""
from __future__ import annotations

import traceback
from typing import Any

from celery import Task as CeleryTask

from models.db import describe_error, is_db_error
from tasks.errors import DatabaseFailure


def where(err: BaseException) -> str:
    """file:line of the innermost frame in our own code that the error passed through."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "site-packages" not in f.filename]
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{'/'.join(last.filename.rsplit('/', 2)[-2:])}:{last.lineno} in {last.name}"


def sanitized(name: str, err: BaseException) -> DatabaseFailure:
    return DatabaseFailure(f"{name}: database error {describe_error(err)} at {where(err)} (its text is not shown: "
                           "it can quote note text)")


class Task(CeleryTask):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as err:
            if not is_db_error(err):
                raise
            raise sanitized(self.name, err) from None
