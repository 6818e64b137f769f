"""DraftConfig never shows the API key (a repr ends up in tracebacks and debug logs)."""
from __future__ import annotations

from drafting.config import DraftConfig

FAKE_KEY = "sk-ant-fake-test-key-0123456789"


def test_the_repr_and_describe_do_not_show_the_api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    config = DraftConfig.from_env()
    assert config.api_key == FAKE_KEY  # still there for the client
    assert FAKE_KEY not in repr(config) and FAKE_KEY not in str(config)
    assert "model='claude" in repr(config)  # the rest stays visible
    assert FAKE_KEY not in str(config.describe()) and config.describe()["api_key_set"] is True
