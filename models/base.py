"""Declarative base shared by every model: naming convention, typed column aliases."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, String
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names make Alembic diffs and error messages predictable.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BigInteger on PostgreSQL, but SQLite only auto-increments "INTEGER PRIMARY KEY".
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")



class UTCDateTime(TypeDecorator[dt.datetime]):
    """`timestamp with time zone` that always hands back an aware UTC datetime.

    PostgreSQL does so already; SQLite (the demo's database) stores no offset and returns
    naive values, which then fail comparisons with utcnow(). Converting here, once, spares
    every reader a "naive means UTC" fix-up. Values going in are converted to UTC (a naive
    one is taken to be UTC already), so SQLite's offset-less text is always UTC. Same DDL as
    DateTime(timezone=True): no migration."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


intpk = Annotated[int, mapped_column(BigIntPK, primary_key=True, autoincrement=True)]
tstamp = Annotated[dt.datetime, mapped_column(UTCDateTime())]
str64 = Annotated[str, mapped_column(String(64))]
jsondict = Annotated[dict[str, Any], mapped_column(JSON)]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON}
