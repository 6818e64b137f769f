"""Why a draft failed, as a small typed tree with one `classify()` from SDK exceptions.

Retryable (same policy the SDK applies internally, so turning its retries off loses
nothing): 429 rate_limit_error, 529 overloaded_error, any other 5xx, 408, 409, connection
errors and timeouts. A server's `x-should-retry` header overrides the status, as the SDK
honours it. Everything else (400 invalid_request_error, 401 authentication_error, 403,
404, 413) is permanent: asking again sends the same bad request.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use: a writeback worker never pays for the SDK
    import anthropic


class DraftError(Exception):
    """A draft could not be produced. `str()` names the cause and the API's own words."""
    retryable = False

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


class DraftApiError(DraftError):
    """The Messages API answered with an error, or could not be reached."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, retry_after=retry_after)
        self.retryable = retryable


class InvalidDraft(DraftError):
    """The model answered, but not in the required format, even after one re-ask."""


class FormatProblem(ValueError):
    """One reply breaks the format; the message is what the re-ask tells the model."""


_TRANSIENT_STATUSES = {408, 409, 429}


def classify(err: anthropic.AnthropicError) -> DraftApiError:
    import anthropic

    if isinstance(err, anthropic.APITimeoutError):
        return DraftApiError("Anthropic API request timed out", retryable=True)
    if isinstance(err, anthropic.APIConnectionError):
        return DraftApiError(f"could not reach the Anthropic API ({err.message})", retryable=True)
    if isinstance(err, anthropic.APIStatusError):
        status = err.status_code
        retryable = status in _TRANSIENT_STATUSES or status >= 500
        hint = err.response.headers.get("x-should-retry")
        if hint in ("true", "false"):
            retryable = hint == "true"
        kind = err.type or "error"
        detail = err.api_message or (err.message or "")[:200]
        return DraftApiError(f"Anthropic API {status} {kind}: {detail}", retryable=retryable, status=status,
                             retry_after=_retry_after(err.response.headers))
    return DraftApiError(f"Anthropic SDK error: {type(err).__name__}: {str(err)[:200]}", retryable=False)


def _retry_after(headers) -> float | None:
    # The API sends integer seconds in retry-after; retry-after-ms is the SDK's finer form.
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue  # an HTTP date: rare from this API; our own backoff applies instead
        if value >= 0:
            return value
    return None
