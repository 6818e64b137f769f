"""Numeric settings from the environment, parsed in one place.

A bare float(os.environ[...]) met with `PSA_READ_TIMEOUT=30s` said only "could not convert
string to float: '30s'", from whichever task first read it; `nan` or `inf` went through
and made every comparison with it false. Here a value that is not a finite number (or not
a whole one, where a count is meant) is a ConfigurationError that names the variable and
what it holds, and the worker reads every such setting at start (worker.signals), so a
typo stops it there instead of failing jobs one by one. Unset or blank: the default.
"""
from __future__ import annotations

import math
import os

from models.crypto import ConfigurationError


def _raw(name: str) -> str | None:
    raw = os.environ.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


def number(name: str, default: float, *, positive: bool = False, minimum: float | None = None) -> float:
    """The environment variable `name` as a float (`default` when unset or blank)."""
    raw = _raw(name)
    if raw is None:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {raw[:40]!r}")
    _check_range(name, raw, value, positive, minimum)
    return value


def integer(name: str, default: int, *, positive: bool = False, minimum: int | None = None) -> int:
    """The environment variable `name` as a whole number (`default` when unset or blank)."""
    raw = _raw(name)
    if raw is None:
        return int(default)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, got {raw[:40]!r}") from None
    _check_range(name, raw, value, positive, minimum)
    return value


def _check_range(name: str, raw: str, value: float, positive: bool, minimum: float | None) -> None:
    if positive and value <= 0:
        raise ConfigurationError(f"{name} must be greater than 0, got {raw[:40]!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum:g}, got {raw[:40]!r}")
