"""`celery -A worker beat` (the Procfile's beat line) keeps its schedule file where
CELERY_BEAT_SCHEDULE_FILE says, not in the directory it was started from."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import wait_for
from tests.ops.conftest import ROOT, procfile_command


@pytest.mark.parametrize("command", ["plain", "procfile"])
def test_beat_writes_its_schedule_file_where_the_setting_says_not_into_the_cwd(tmp_path, command):
    cwd, files = tmp_path / "somewhere", tmp_path / "state"
    cwd.mkdir()
    files.mkdir()
    env = {**os.environ, "CELERY_BEAT_SCHEDULE_FILE": str(files / "beat-schedule"),
           "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           # a filesystem broker of its own: the sweeps it sends reach no other test's worker
           "CELERY_BROKER_URL": "", "PSA_WRITEBACK_VAR": str(tmp_path / "var")}
    log = tmp_path / "beat.log"
    argv = procfile_command("beat") if command == "procfile" else [sys.executable, "-m", "celery", "-A", "worker",
                                                                    "beat", "-l", "INFO"]
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Sending due task" in log.read_text() or proc.poll() is not None, timeout=30,
                 message="beat to send its first task")
        assert proc.poll() is None, log.read_text()[-2000:]
        assert [p.name for p in files.iterdir() if p.name.startswith("beat-schedule")], log.read_text()[-2000:]
        assert list(cwd.iterdir()) == []  # nothing written where it was started
        assert f"db -> {files / 'beat-schedule'}" in log.read_text()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
