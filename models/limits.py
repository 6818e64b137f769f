"""Vendor strings cut to their columns before they are written.

A PSA chooses its status names and note ids; a 300-character name once overflowed
`String(200)` and failed the outcome of a job whose note was posted and whose status had
verified. Every write of a row that can hold a vendor string goes through `clamp`, so a
long value is stored cut and the write itself never fails on its length.
"""
from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import String, Table


@cache
def limits(table: Table) -> dict[str, int]:
    """Column name -> length, for the table's length-limited string columns."""
    return {c.name: c.type.length for c in table.columns if isinstance(c.type, String) and c.type.length}


def clamp(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every string longer than its column cut to fit (the same dict when
    nothing is too long: this runs on every write of the worker's hot path)."""
    lengths = limits(table)
    cut = {k: v[:lengths[k]] for k, v in values.items()
           if isinstance(v, str) and k in lengths and len(v) > lengths[k]}
    return {**values, **cut} if cut else values
