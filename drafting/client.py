"""One ask to the Messages API, with the only retry loop drafting has.

Retries are split so they never multiply: the SDK client is built with `max_retries=0`
(its default of 2 would hide up to 3 HTTP calls inside each of ours, unlogged and with
Retry-After honoured without a cap), and this module retries transient errors with
tenacity: up to DRAFT_MAX_ATTEMPTS HTTP calls per ask, exponential backoff from
DRAFT_RETRY_BASE_SECONDS with "equal jitter", a server's Retry-After taken as a floor,
every wait capped at DRAFT_RETRY_MAX_DELAY_SECONDS. A Retry-After longer than that cap fails
the draft at once, saying so: retrying before it only earns another 429. Celery never retries a draft (the
task has max_retries=0). The worst case is therefore 2 asks (the reply and one re-ask
for format) x DRAFT_MAX_ATTEMPTS HTTP calls, each bounded by DRAFT_TIMEOUT_SECONDS.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from drafting.config import DraftConfig
from drafting.errors import DraftApiError, DraftError, classify
from tasks.retry import jittered_delay

if TYPE_CHECKING:  # the SDK (and pydantic) cost a writeback worker ~50 MB: imported on first use
    import anthropic

log = logging.getLogger("psa_writeback.drafting")


@dataclass
class Usage:
    """Running totals for one preview, failed calls included (the row records them)."""
    api_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None


@dataclass(frozen=True)
class ModelReply:
    text: str
    stop_reason: str | None
    model: str


_clients: dict[tuple[str, str | None, float], "anthropic.Anthropic"] = {}
_clients_lock = threading.Lock()


def client_for(cfg: DraftConfig) -> "anthropic.Anthropic":
    """One SDK client (and its connection pool) per key/endpoint/timeout, shared by the
    worker's threads; the SDK client is thread-safe."""
    cfg.require_api_key()
    key = (cfg.api_key, cfg.base_url, cfg.timeout_seconds)
    with _clients_lock:
        if key not in _clients:
            import anthropic

            # api_key passed explicitly: the SDK then consults no other credential source
            # (profiles, federation files), so "no ANTHROPIC_API_KEY" means exactly that.
            _clients[key] = anthropic.Anthropic(api_key=cfg.api_key, base_url=cfg.base_url, max_retries=0,
                                                timeout=cfg.timeout_seconds)
        return _clients[key]


def ask(cfg: DraftConfig, system: str, messages: list[dict[str, Any]], usage: Usage, *,
        context: str = "") -> ModelReply:
    """Send one request, retrying transient errors; raise DraftApiError when it gives up."""
    client = client_for(cfg)
    retrying = Retrying(stop=stop_after_attempt(cfg.max_attempts), wait=_backoff(cfg),
                        retry=retry_if_exception(lambda e: isinstance(e, DraftError) and e.retryable
                                                 and not _waits_too_long(e, cfg)),
                        before_sleep=lambda state: _log_retry(state, context), reraise=True)
    try:
        for attempt in retrying:
            with attempt:
                return _call(client, cfg, system, messages, usage)
    except DraftApiError as err:
        if err.retryable and _waits_too_long(err, cfg):
            raise DraftApiError(f"{err.message} (the API asked to wait {err.retry_after:g}s, longer than a draft may "
                                f"wait: DRAFT_RETRY_MAX_DELAY_SECONDS={cfg.retry_max_delay_seconds:g})",
                                retryable=False, status=err.status, retry_after=err.retry_after) from err
        if err.retryable:  # attempts exhausted: say so, keep the API's own words
            raise DraftApiError(f"{err.message} (gave up after {cfg.max_attempts} attempts)", retryable=False,
                                status=err.status) from err
        raise
    raise AssertionError("unreachable: tenacity either returns or re-raises")


def _call(client: "anthropic.Anthropic", cfg: DraftConfig, system: str, messages: list[dict[str, Any]],
          usage: Usage) -> ModelReply:
    import anthropic

    usage.api_calls += 1
    try:
        message = client.messages.create(model=cfg.model, max_tokens=cfg.max_tokens, system=system,
                                         messages=messages)
    except anthropic.AnthropicError as err:
        raise classify(err) from err
    usage.input_tokens += message.usage.input_tokens
    usage.output_tokens += message.usage.output_tokens
    usage.model = message.model
    text = "".join(block.text for block in message.content if getattr(block, "type", None) == "text")
    return ModelReply(text=text, stop_reason=message.stop_reason, model=message.model)


def _waits_too_long(err: BaseException, cfg: DraftConfig) -> bool:
    """The API's Retry-After is beyond what a draft may wait: honouring it would park a
    worker thread (and the engineer waiting on the preview) for longer than the cap, and
    asking sooner only earns another 429. The draft fails instead, naming the wait."""
    retry_after = getattr(err, "retry_after", None)
    return retry_after is not None and retry_after > cfg.retry_max_delay_seconds


def _backoff(cfg: DraftConfig):
    def wait(state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome else None
        # Retry-After is a floor (asking sooner only earns another 429); one beyond the cap
        # never gets here (_waits_too_long fails the draft instead).
        retry_after = err.retry_after if isinstance(err, DraftError) else None
        return jittered_delay(state.attempt_number, cfg.retry_base_seconds, cfg.retry_max_delay_seconds,
                              retry_after=retry_after)
    return wait


def _log_retry(state: RetryCallState, context: str) -> None:
    err = state.outcome.exception() if state.outcome else None
    log.warning("draft %s: attempt %d failed (%s); retrying in %.2fs", context, state.attempt_number,
                getattr(err, "message", type(err).__name__), state.upcoming_sleep)
