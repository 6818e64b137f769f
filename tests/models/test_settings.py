"""Numeric settings (models.settings): a value that does not parse names its variable, and
a worker started with one stops at once instead of failing jobs one by one."""
from __future__ import annotations

import os
import uuid

import pytest

from models import settings
from models.crypto import ConfigurationError
from providers import http
from tasks import retry
from tests import harness
from worker import startup


@pytest.mark.parametrize("raw, expected", [(None, 30.0), ("", 30.0), ("  ", 30.0), ("12.5", 12.5), (" 7 ", 7.0),
                                           ("1e2", 100.0)])
def test_a_number_is_read_or_defaults_when_unset_or_blank(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("PSA_READ_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PSA_READ_TIMEOUT", raw)
    assert http.timeouts()[1] == expected


@pytest.mark.parametrize("raw, message", [
    ("30s", "PSA_READ_TIMEOUT must be a number, got '30s'"),
    ("nan", "PSA_READ_TIMEOUT must be a finite number, got 'nan'"),
    ("inf", "PSA_READ_TIMEOUT must be a finite number, got 'inf'"),
    ("0", "PSA_READ_TIMEOUT must be greater than 0, got '0'"),
    ("-3", "PSA_READ_TIMEOUT must be greater than 0, got '-3'"),
])
def test_a_number_that_does_not_parse_names_the_variable(monkeypatch, raw, message):
    monkeypatch.setenv("PSA_READ_TIMEOUT", raw)
    with pytest.raises(ConfigurationError) as err:
        http.timeouts()
    assert str(err.value) == message


@pytest.mark.parametrize("name, raw, message", [
    ("RETRY_MAX_ATTEMPTS", "8.5", "RETRY_MAX_ATTEMPTS must be a whole number, got '8.5'"),
    ("RETRY_MAX_ATTEMPTS", "0", "RETRY_MAX_ATTEMPTS must be greater than 0, got '0'"),
    ("RETRY_FACTOR", "0.5", "RETRY_FACTOR must be at least 1, got '0.5'"),
    ("RETRY_BASE_SECONDS", "-1", "RETRY_BASE_SECONDS must be at least 0, got '-1'"),
])
def test_counts_and_ranges_are_checked(monkeypatch, name, raw, message):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigurationError, match=f"^{message}$"):
        retry.RetryPolicy.from_env()


def test_a_long_value_is_cut_in_the_message(monkeypatch):
    monkeypatch.setenv("X_TEST_SETTING", "y" * 500)
    with pytest.raises(ConfigurationError) as err:
        settings.integer("X_TEST_SETTING", 1)
    assert len(str(err.value)) < 100


def test_the_startup_check_names_every_bad_setting_at_once(monkeypatch):
    monkeypatch.setenv("PSA_CONNECT_TIMEOUT", "five")
    monkeypatch.setenv("VERIFY_READS", "many")
    with pytest.raises(ConfigurationError) as err:
        startup.check_settings()
    assert "PSA_CONNECT_TIMEOUT must be a number, got 'five'" in str(err.value)
    assert "VERIFY_READS must be a whole number, got 'many'" in str(err.value)
    assert str(err.value).count("PSA_CONNECT_TIMEOUT") == 1  # read by several functions, told once


def test_the_startup_check_passes_on_the_defaults():
    startup.check_settings()  # the suite's own environment: nothing to say


def test_a_worker_started_with_a_bad_setting_stops_at_once_and_says_which(tmp_path):
    env = dict(os.environ, PSA_READ_TIMEOUT="30s")
    log = tmp_path / "worker.log"
    worker = harness.WorkerProcess(env, queues=f"settings-{uuid.uuid4().hex[:8]}", log_path=log)
    with pytest.raises(RuntimeError, match="worker exited early"):
        worker.start(timeout=60)
    assert worker.proc.wait(10) != 0
    text = log.read_text()
    assert "PSA_READ_TIMEOUT must be a number, got '30s'" in text and " ready." not in text


def test_every_numeric_setting_is_in_the_readme():
    """The README is the operators' only reference: a setting read in code and missing there
    is a bug in one of them."""
    names = _read_in_code()
    assert len(names) > 30  # the scan found the settings
    readme = (harness.ROOT / "README.md").read_text()
    assert sorted(n for n in names if n not in readme) == []


def _read_in_code() -> dict[str, str]:
    """Every numeric setting the code reads through models.settings: name -> file."""
    import re

    found = {}
    for path in harness.ROOT.glob("**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts or "bench" in path.parts:
            continue
        text = path.read_text()
        for name in re.findall(r'settings\.(?:number|integer)\(\s*"([A-Z0-9_]+)"', text):
            found[name] = path.name
        for name in re.findall(r'_env_int\(\s*"([A-Z0-9_]+)"', text):
            found[name] = path.name
    return found


def test_the_startup_check_reads_every_setting_the_worker_reads(monkeypatch):
    """worker.startup lists the functions that read settings: a setting added without its
    reader there would escape the check. (celeryconfig's are read as the worker imports it,
    and the metrics process's port by its own command line: both fail at start already.)"""
    names = {n: f for n, f in _read_in_code().items() if f not in ("celeryconfig.py", "metrics.py")}
    assert len(names) > 25
    missed = []
    for name in names:  # one at a time: a reader of several stops at its first bad one
        with monkeypatch.context() as m:
            m.setenv(name, "not-a-number")
            try:
                startup.check_settings()
                missed.append(name)
            except ConfigurationError as err:
                if f"{name} must be" not in str(err):
                    missed.append(name)
    assert missed == []
