"""Drafting configuration, read from the environment when a draft runs.

| variable | default | meaning |
| --- | --- | --- |
| `ANTHROPIC_API_KEY` | (none) | required to draft; cache hits work without it |
| `ANTHROPIC_BASE_URL` | the SDK's (`https://api.anthropic.com`) | tests point it at the fake API |
| `DRAFT_MODEL` | `claude-sonnet-5-5` | the model id sent with every request |
| `DRAFT_MAX_TOKENS` | 2048 | reply budget; a reply cut off there is rejected |
| `DRAFT_TIMEOUT_SECONDS` | 60 | per HTTP request to the API |
| `DRAFT_MAX_ATTEMPTS` | 4 | HTTP attempts per ask on 429/529/5xx/timeouts |
| `DRAFT_RETRY_BASE_SECONDS` | 2 | first backoff; doubles per attempt, jittered |
| `DRAFT_RETRY_MAX_DELAY_SECONDS` | 30 | cap on one backoff; a longer Retry-After fails the draft (never retried early) |
| `DRAFT_MAX_TRANSCRIPT_CHARS` | 200000 | longer transcripts keep the first and latest turns |

Configuration errors are kept outside the DraftError tree (as django-anymail does) so no
retry policy can ever swallow them: a missing key fails the draft at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# The newest Sonnet the installed SDK (anthropic 2.14) knows; claude-sonnet-4-5 is on the
# SDK's deprecation list (end of life 2026-11-30), so it is not a safe default.
DEFAULT_MODEL = "claude-sonnet-5-5"


class DraftConfigError(Exception):
    """Drafting is misconfigured (no API key, a malformed setting). Never retried."""


@dataclass(frozen=True)
class DraftConfig:
    api_key: str = field(default="", repr=False)  # a secret: never in a repr, a log line or a traceback
    base_url: str | None = None
    model: str = DEFAULT_MODEL
    max_tokens: int = 2048
    timeout_seconds: float = 60.0
    max_attempts: int = 4
    retry_base_seconds: float = 2.0
    retry_max_delay_seconds: float = 30.0
    max_transcript_chars: int = 200_000

    @classmethod
    def from_env(cls) -> "DraftConfig":
        env = os.environ
        return cls(api_key=env.get("ANTHROPIC_API_KEY", "").strip(),
                   base_url=env.get("ANTHROPIC_BASE_URL", "").strip() or None,
                   model=env.get("DRAFT_MODEL", "").strip() or DEFAULT_MODEL,
                   max_tokens=_number("DRAFT_MAX_TOKENS", int, cls.max_tokens, low=1),
                   timeout_seconds=_number("DRAFT_TIMEOUT_SECONDS", float, cls.timeout_seconds, low=0.1),
                   max_attempts=_number("DRAFT_MAX_ATTEMPTS", int, cls.max_attempts, low=1),
                   retry_base_seconds=_number("DRAFT_RETRY_BASE_SECONDS", float, cls.retry_base_seconds, low=0),
                   retry_max_delay_seconds=_number("DRAFT_RETRY_MAX_DELAY_SECONDS", float,
                                                   cls.retry_max_delay_seconds, low=0),
                   max_transcript_chars=_number("DRAFT_MAX_TRANSCRIPT_CHARS", int, cls.max_transcript_chars,
                                                low=1000))

    def require_api_key(self) -> None:
        if not self.api_key:
            raise DraftConfigError("ANTHROPIC_API_KEY is not set on the drafting worker: "
                                   "drafts cannot be generated until it is configured")

    @property
    def lease_seconds(self) -> float:
        """How long one execution may own a preview: every attempt of the ask and the
        re-ask timing out after its longest backoff, plus a margin for the database."""
        return 2 * self.max_attempts * (self.timeout_seconds + self.retry_max_delay_seconds) + 30

    def describe(self) -> dict[str, object]:
        """For logs and the CLI: everything but the key (only whether one is set)."""
        return {"model": self.model, "max_tokens": self.max_tokens, "timeout_seconds": self.timeout_seconds,
                "max_attempts": self.max_attempts, "base_url": self.base_url or "(SDK default)",
                "api_key_set": bool(self.api_key)}


def _number(name: str, kind: type, default: float, *, low: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise DraftConfigError(f"{name} must be {what}, got {raw[:40]!r}") from None
    if value < low:
        raise DraftConfigError(f"{name} must be at least {low}, got {value}")
    return value
