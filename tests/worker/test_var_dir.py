"""The demo's ./var (SQLite database with encrypted keys and note bodies, filesystem broker
messages) is created owner-only, by whichever entry point makes it first."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {
    "database": "from models.db import database_url; database_url()",
    "broker": "import celeryconfig",
    "demo": "from worker.demo import _prepare_environment; _prepare_environment(keep=True)",
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("exists", [False, True], ids=["new", "existing-0755"])
def test_var_is_owner_only(tmp_path, entry, exists):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "PSA_WRITEBACK_VAR")}
    env["PYTHONPATH"] = str(ROOT)
    if exists:
        (tmp_path / "var").mkdir(mode=0o755)
    code = f"import os; os.umask(0o022); {ENTRY_POINTS[entry]}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700
