"""Vendor errors as a small typed tree. Every PSA call raises one of these or returns.

`retryable` decides retry versus fail-now; `retry_after` (seconds) is the vendor's own
wish (429 Retry-After) and overrides a shorter backoff. Configuration problems are not
here (models.crypto.ConfigurationError) so no retry policy can swallow them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from providers.text import clean_line

BODY_EXCERPT_LIMIT = 300
VENDOR_CODE_LIMIT = 100


class PsaError(Exception):
    retryable: bool = False
    kind: str = "psa_error"

    def __init__(self, message: str, *, status_code: int | None = None, vendor_code: str | None = None,
                 retry_after: float | None = None, operation: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.vendor_code = vendor_code
        self.retry_after = retry_after
        self.operation = operation

    def __str__(self) -> str:
        # One line that says what we tried, what the vendor said, and its HTTP status.
        parts = [self.operation or "PSA call", "failed"]
        if self.status_code is not None:
            parts.append(f"with HTTP {self.status_code}")
        text = " ".join(parts) + f": {self.message}"
        if self.vendor_code:
            text += f" [{self.vendor_code}]"
        return text


class PsaTransientError(PsaError):
    """Timeouts, resets, 5xx: the request may or may not have been applied."""
    retryable = True
    kind = "transient"


class PsaUnreachable(PsaTransientError):
    """No connection to the PSA could be made (refused, unresolvable, connect timeout):
    nothing was sent, so nothing can have been applied."""
    kind = "unreachable"


class PsaRateLimited(PsaTransientError):
    kind = "rate_limited"


class PsaRecordBusy(PsaTransientError):
    """ConnectWise 409: the record is in use by someone else."""
    kind = "record_busy"


class PsaPermanentError(PsaError):
    retryable = False
    kind = "permanent"


class PsaBadRequest(PsaPermanentError):
    kind = "bad_request"


class PsaAuthError(PsaPermanentError):
    """401: the connection's credentials no longer work (alert once per connection)."""
    kind = "auth"


class PsaPermissionDenied(PsaPermanentError):
    kind = "permission"


class PsaNotFound(PsaPermanentError):
    kind = "not_found"


class PsaInvalidStatus(PsaBadRequest):
    """The target status id does not exist on the ticket's board."""
    kind = "invalid_status"


class PsaBusinessRuleError(PsaBadRequest):
    """The PSA refused the write on a business rule (Autotask: HTTP 500 with an `errors`
    array): the same request fails the same way, so it is permanent despite the 5xx."""
    kind = "business_rule"


class PsaProtocolError(PsaTransientError):
    """A 2xx whose body we cannot read: treat as transient (proxies, truncated replies)."""
    kind = "protocol"


class PsaDeadlineExceeded(PsaTransientError):
    """No complete reply within PSA_CALL_DEADLINE_SECONDS (a slow or dribbling server).
    Retryable, like a timeout: a GET may simply be asked again, and a POST cut mid-reply
    may have landed, which tasks.retry.post_may_have_landed then reconciles instead of
    posting blind. Bounded by the job's attempts, and each attempt by the deadline."""
    kind = "deadline"


class PsaResponseTooLarge(PsaPermanentError):
    """The reply passed PSA_MAX_RESPONSE_BYTES (declared or decoded): asking again would
    only fetch the same flood, so the job fails with the limit named."""
    kind = "response_too_large"


class PsaRedirectRefused(PsaPermanentError):
    """A 3xx. Never followed: it would re-send the note and the credentials elsewhere."""
    kind = "redirect"


class PsaUnsafeDestination(PsaPermanentError):
    """The connection's URL or the address it resolves to is not one the worker may call
    (providers.netguard): plain http, loopback, private, link-local, metadata..."""
    kind = "unsafe_destination"


def _retry_after(headers: Any) -> float | None:
    raw = (headers or {}).get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


ErrorMapping = Callable[[int, Any, "str | None"], "PsaError | None"]
_MAPPINGS: dict[str, ErrorMapping] = {}


def register_mapping(provider: str, mapping: ErrorMapping) -> None:
    """A provider's own reading of its error replies, consulted before the shared one
    (mapping(status, body, operation) -> a PsaError, or None to fall through)."""
    _MAPPINGS[provider] = mapping


def from_response(status: int, body: Any, headers: Any = None, *, operation: str | None = None,
                  provider: str | None = None) -> PsaError:
    """Map an error reply (status, parsed JSON or text, headers) to a typed error."""
    mapping = _MAPPINGS.get(provider or "")
    special = mapping(status, body, operation) if mapping is not None else None
    if special is not None:
        special.operation = special.operation or operation
        return special
    message, code, field_errors = vendor_message(body)
    kwargs = dict(status_code=status, vendor_code=code, operation=operation)
    if status == 429:
        return PsaRateLimited(message or "rate limited", retry_after=_retry_after(headers), **kwargs)
    if status == 409:
        return PsaRecordBusy(message or "record in use", retry_after=_retry_after(headers), **kwargs)
    if status >= 500:
        return PsaTransientError(message or "server error", retry_after=_retry_after(headers), **kwargs)
    if status == 401:
        return PsaAuthError(message or "authentication failed", **kwargs)
    if status == 403:
        return PsaPermissionDenied(message or "permission denied", **kwargs)
    if status == 404:
        return PsaNotFound(message or "not found", **kwargs)
    if status == 400 and any(e.get("field") in ("status/id", "status") for e in field_errors):
        return PsaInvalidStatus(message, **kwargs)
    return PsaBadRequest(message or f"HTTP {status}", **kwargs)


def vendor_message(body: Any) -> tuple[str, str | None, list[dict[str, Any]]]:
    """ConnectWise errors: {"code","message","errors":[{"code","message","field"}]}.

    Only a parsed JSON reply's own message is kept, cleaned of control characters and
    clamped (providers.text). providers.http passes None for a non-JSON body: an HTML
    page or a banner from whatever answered is never copied into error_message and
    alerts, where it would let a tenant read other servers' replies through us."""
    if isinstance(body, dict):
        raw = body.get("errors") if isinstance(body.get("errors"), list) else []
        errors = [e for e in raw if isinstance(e, dict)]
        message = str(body.get("message") or "")
        # Autotask lists plain strings: {"errors": ["..."]}
        texts = [str(e.get("message")) for e in errors if e.get("message")]
        texts += [e for e in raw if isinstance(e, str) and e.strip()]
        details = "; ".join(texts)
        if details:
            message = f"{message} ({details})" if message else details
        code = body.get("code")
        return (clean_line(message, BODY_EXCERPT_LIMIT), None if code is None else clean_line(code, VENDOR_CODE_LIMIT),
                errors)
    if isinstance(body, str):  # a JSON string reply
        return clean_line(body, BODY_EXCERPT_LIMIT), None, []
    return "", None, []
