"""Errors the enqueue API and tasks raise to their callers.

RequestError and its subclasses mean "your input is wrong": nothing was written, nothing
was sent. JobFailed / VerificationFailed are raised by a task *after* the job row records
the outcome, so Flower shows the task as FAILURE with a readable reason.
"""
from __future__ import annotations


class RequestError(ValueError):
    """Bad input: a clear message, nothing written, never retried."""
    code = "invalid_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, str | None]:
        return {"error": self.code, "message": self.message, "field": self.field}


class NotFoundError(RequestError):
    code = "not_found"


class ConflictError(RequestError):
    code = "conflict"


class JobFailed(Exception):
    """The job ended `failed`; the message says why (vendor message included)."""


class VerificationFailed(Exception):
    """The PSA accepted the status change but the re-read shows another status."""


class LeaseLost(Exception):
    """Another execution owns the job now (our lease expired); stop without writing."""


class WorkerLost(Exception):
    """Executions of the job ended without an outcome until its attempts ran out."""


class PoisonMessage(Exception):
    """A task message that can never be executed (its job row is gone, or it names a job
    of another kind). Raised so Flower shows FAILURE with the reason; never retried."""


class DatabaseUnavailable(Exception):
    """The database could not be reached; the task retries. Carries only the error's type
    and SQLSTATE (models.db.describe_error): a driver's text can quote the statement's values."""


class DatabaseFailure(Exception):
    """A database error a task could not handle, named by type, SQLSTATE and where it was
    raised, without its text (see DatabaseUnavailable). Raised `from None`, so neither the
    log nor Flower's traceback shows the original."""
