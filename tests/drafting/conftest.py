"""Drafting fixtures: the fake Anthropic Messages API over real HTTP, a real worker
process on the `drafting` queue with the SDK pointed at the fake by ANTHROPIC_BASE_URL,
and builders for sessions with transcripts. Keys are obviously fake."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from providers.simulators.anthropic import FakeAnthropic
from tests import harness

FAKE_KEY = "sk-ant-test-fake"
TEST_MODEL = "claude-sonnet-4-6"  # not the default, so the tests prove DRAFT_MODEL is honoured
TEST_MAX_TOKENS = 1500

# Small backoffs keep the module fast; the retry-after cap (1.5 s) still lets a test see a
# 1 s Retry-After honoured.
DRAFT_ENV = {
    "DRAFT_MODEL": TEST_MODEL,
    "DRAFT_MAX_TOKENS": str(TEST_MAX_TOKENS),
    "DRAFT_TIMEOUT_SECONDS": "5",
    "DRAFT_MAX_ATTEMPTS": "3",
    "DRAFT_RETRY_BASE_SECONDS": "0.05",
    "DRAFT_RETRY_MAX_DELAY_SECONDS": "1.5",
}


def _without_credentials(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")}


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture()
def api(fake_api: FakeAnthropic) -> FakeAnthropic:
    """The module's fake API with an empty script and no recorded requests."""
    fake_api.reset()
    return fake_api


@pytest.fixture(scope="module")
def drafting_worker(worker_env, fake_api) -> Iterator[harness.WorkerProcess]:
    env = {**_without_credentials(worker_env), **DRAFT_ENV, "ANTHROPIC_API_KEY": FAKE_KEY,
           "ANTHROPIC_BASE_URL": fake_api.base_url}
    proc = harness.WorkerProcess(env, queues="drafting", concurrency=2).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyless_worker(worker_env, fake_api) -> Iterator[harness.WorkerProcess]:
    """A drafting worker with no API key, on its own queue so only the test that means
    to reach it does."""
    env = {**_without_credentials(worker_env), **DRAFT_ENV, "ANTHROPIC_BASE_URL": fake_api.base_url}
    proc = harness.WorkerProcess(env, queues="drafting-nokey", concurrency=1).start()
    yield proc
    proc.stop()
