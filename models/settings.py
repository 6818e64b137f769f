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
from collections.abc import Callable
from typing import Any

from models.crypto import ConfigurationError


def number(name: str, default: float, *, positive: bool = False, minimum: float | None = None) -> float:
    """The environment variable `name` as a float (`default` when unset or blank)."""
    return _read(name, float(default), float, "a number", positive, minimum)


def integer(name: str, default: int, *, positive: bool = False, minimum: int | None = None) -> int:
    """The environment variable `name` as a whole number (`default` when unset or blank)."""
    return _read(name, int(default), int, "a whole number", positive, minimum)


def _read(name: str, default: Any, convert: Callable[[str], Any], what: str, positive: bool,
          minimum: float | None) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    shown = repr(raw[:40])
    try:
        value = convert(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be {what}, got {shown}") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {shown}")
    if positive and value <= 0:
        raise ConfigurationError(f"{name} must be greater than 0, got {shown}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum:g}, got {shown}")
    return value
