"""The retry layer and error classification, in-process: the real SDK over HTTP to the fake
API. (The worker-level tests cover the same paths end to end; these pin the edges.)"""
from __future__ import annotations

import pytest

from drafting.client import Usage, ask
from drafting.config import DraftConfig, DraftConfigError
from drafting.errors import DraftApiError
from providers.simulators.anthropic import Reply
from tests.drafting.conftest import FAKE_KEY

MESSAGES = [{"role": "user", "content": "<session>...</session>"}]


def _cfg(api, **overrides) -> DraftConfig:
    opts = dict(api_key=FAKE_KEY, base_url=api.base_url, model="claude-sonnet-5-5", max_tokens=64,
                timeout_seconds=2, max_attempts=3, retry_base_seconds=0.01, retry_max_delay_seconds=0.5)
    return DraftConfig(**{**opts, **overrides})


def test_a_reply_returns_text_and_counts_usage(api):
    api.reply_text("hello", input_tokens=11, output_tokens=7)
    usage = Usage()
    reply = ask(_cfg(api), "system text", MESSAGES, usage)
    assert (reply.text, reply.stop_reason, reply.model) == ("hello", "end_turn", "claude-sonnet-5-5")
    assert (usage.api_calls, usage.input_tokens, usage.output_tokens) == (1, 11, 7)
    [req] = api.messages_requests()
    assert req.body == {"model": "claude-sonnet-5-5", "max_tokens": 64, "system": "system text",
                        "messages": MESSAGES}


@pytest.mark.parametrize("status", [429, 500, 503, 529])
def test_transient_statuses_are_retried_by_us_and_never_by_the_sdk(api, status):
    api.reply_error(status)
    api.reply_text("ok")
    usage = Usage()
    assert ask(_cfg(api), "s", MESSAGES, usage).text == "ok"
    assert usage.api_calls == 2
    assert [r.headers["x-stainless-retry-count"] for r in api.messages_requests()] == ["0", "0"]


@pytest.mark.parametrize("status, kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                          (403, "permission_error"), (404, "not_found_error")])
def test_client_errors_are_permanent_and_keep_the_api_message(api, status, kind):
    api.reply_error(status, "the API's own words")
    with pytest.raises(DraftApiError) as info:
        ask(_cfg(api), "s", MESSAGES, Usage())
    assert info.value.retryable is False and info.value.status == status
    assert str(info.value) == f"Anthropic API {status} {kind}: the API's own words"
    assert len(api.messages_requests()) == 1


def test_x_should_retry_false_overrides_a_5xx(api):
    api.reply_error(500, headers={"x-should-retry": "false"})
    with pytest.raises(DraftApiError, match="500 api_error"):
        ask(_cfg(api), "s", MESSAGES, Usage())
    assert len(api.messages_requests()) == 1


def test_retry_after_is_a_floor(api):
    api.reply_error(429, retry_after=0.4)
    api.reply_text("ok")
    ask(_cfg(api, retry_max_delay_seconds=0.5, retry_base_seconds=0.01), "s", MESSAGES, Usage())
    first, second = api.messages_requests()
    assert 0.4 <= second.at - first.at < 5


def test_a_retry_after_beyond_the_cap_fails_the_draft_instead_of_retrying_early(api):
    # given the API answering 429 with retry-after 32 s, more than a draft may wait (30 s)
    api.reply_error(429, retry_after=32)
    api.reply_text("ok")  # what an early retry would (wrongly) have got
    usage = Usage()
    # then the draft fails at once, naming the wait and the cap, and never asks again early
    with pytest.raises(DraftApiError) as info:
        ask(_cfg(api, retry_max_delay_seconds=30), "s", MESSAGES, usage)
    assert info.value.retryable is False and info.value.status == 429
    assert "asked to wait 32s" in str(info.value) and "DRAFT_RETRY_MAX_DELAY_SECONDS=30" in str(info.value)
    assert len(api.messages_requests()) == 1 and usage.api_calls == 1


def test_a_timeout_is_retried_then_gives_up_naming_the_attempts(api):
    for _ in range(2):
        api.script.append(Reply(text="late", delay=0.6))
    with pytest.raises(DraftApiError, match=r"^Anthropic API request timed out \(gave up after 2 attempts\)$"):
        ask(_cfg(api, timeout_seconds=0.2, max_attempts=2), "s", MESSAGES, Usage())
    assert len(api.messages_requests()) == 2


def test_no_key_is_a_configuration_error_before_any_request(api):
    with pytest.raises(DraftConfigError, match="ANTHROPIC_API_KEY is not set"):
        ask(_cfg(api, api_key=""), "s", MESSAGES, Usage())
    assert api.messages_requests() == []


def test_backoff_is_the_shared_jittered_delay_with_retry_after_capped(monkeypatch):
    from types import SimpleNamespace

    from drafting import client

    monkeypatch.setattr("random.uniform", lambda lo, hi: hi)  # the top of each jitter window
    cfg = SimpleNamespace(retry_base_seconds=1.0, retry_max_delay_seconds=5.0)
    wait = client._backoff(cfg)

    def state(n, err=None):
        return SimpleNamespace(attempt_number=n, outcome=SimpleNamespace(exception=lambda: err))

    assert [wait(state(n)) for n in (1, 2, 3, 4, 9)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    limited = DraftApiError("429", retryable=True, retry_after=3.0)
    assert wait(state(1, limited)) == 3.0
    assert wait(state(1, DraftApiError("429", retryable=True, retry_after=600.0))) == 5.0  # the cap wins
