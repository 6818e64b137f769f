"""Run Alembic migrations from code (the CLI's `migrate`, the demo, the tests)."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from models.db import database_url, normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url) if url else database_url())
    return cfg


def upgrade(url: str | None = None, revision: str = "heads") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_heads(url: str | None = None) -> list[str]:
    from alembic.runtime.migration import MigrationContext
    from models.db import make_engine

    engine = make_engine(url or database_url())
    try:
        with engine.connect() as conn:
            return list(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
