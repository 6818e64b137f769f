"""Real parts for the tests: a fresh PostgreSQL database, a Redis database, a Celery worker
process, and the ConnectWise simulator. Imported by conftest; usable from bench/ too."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
# An obviously fake key, generated per run: tests never see a real credential.
FAKE_FERNET_KEY = "ZmFrZS10ZXN0LWtleS1ub3QtYS1yZWFsLXNlY3JldCE="

TEST_ENV = {
    "PSA_WRITEBACK_ENCRYPTION_KEYS": FAKE_FERNET_KEY,
    "VERIFY_READS": "3",
    "VERIFY_INTERVAL_SECONDS": "0.05",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_DELAY_SECONDS": "2",
    "PSA_READ_TIMEOUT": "3",
    # After a POST that may have landed, the next look waits this long (default: the read
    # timeout); tests that need the full settle time set it themselves.
    "POST_SETTLE_SECONDS": "0.5",
    "JOB_LEASE_SECONDS": "20",
    "SWEEP_INTERVAL_SECONDS": "1",
    "SWEEP_REPUBLISH_AFTER_SECONDS": "2",
    "CELERY_VISIBILITY_TIMEOUT": "30",
    # The simulators and hostile test servers listen on loopback, which the worker refuses
    # for a tenant's PSA unless the operator allows it (providers.netguard).
    "PSA_ALLOWED_HOSTS": "127.0.0.1,localhost,::1",
}


def create_database() -> str:
    name = f"pswb_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = psycopg2.connect(ADMIN_URL.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = psycopg2.connect(ADMIN_URL.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    conn.close()


def truncate_all(engine: Any) -> None:
    from models import Base

    from sqlalchemy.exc import OperationalError

    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                # Ids are not restarted: the suite's shared worker may still hold a message an
                # earlier test published ("job 1"), which must find nothing rather than this
                # test's job 1 (a task-received event for it would be taken for this test's).
                conn.execute(text(f"TRUNCATE {tables} CONTINUE IDENTITY CASCADE"))
            return
        except OperationalError as err:
            # A worker still finishing the previous test's job locks these tables in another
            # order; PostgreSQL breaks the deadlock by aborting one side. Ours: try again.
            if "deadlock detected" not in str(err) or attempt == 4:
                raise
            time.sleep(0.2)


class WorkerProcess:
    """`celery -A worker worker` as a real subprocess (its own process group)."""

    def __init__(self, env: dict[str, str], *, pool: str | None = "threads", concurrency: int | None = 8,
                 queues: str = "writeback", beat: bool = False, log_path: Path | None = None,
                 extra: list[str] | None = None, app: str = "worker") -> None:
        # pool / concurrency None: leave the flag out (WORKER_POOL / WORKER_CONCURRENCY decide).
        self.env = dict(env)
        self.log_path = log_path or Path(f"/tmp/pswb-worker-{uuid.uuid4().hex[:8]}.log")
        self.name = f"w{uuid.uuid4().hex[:6]}@%h"
        self.args = [sys.executable, "-m", "celery", "-A", app, "worker"]
        self.args += ["-P", pool] if pool is not None else []
        self.args += ["-c", str(concurrency)] if concurrency is not None else []
        self.args += ["-Q", queues, "-n", self.name, "-l", "INFO", "--without-gossip", "--without-mingle"]
        if beat:
            self.args += ["-B", "-s", str(self.log_path.with_suffix(".beat"))]
        self.args += extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "WorkerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early; log:\n{self.log_text()[-3000:]}")
            if " ready." in self.log_text():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s; log:\n{self.log_text()[-3000:]}")

    def mark(self) -> int:
        """Where the log ends now: pass it to `log_text(since=...)` to read only what is
        written after it (a module-scoped worker's log holds every earlier test's lines)."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset `since` (a `mark()`) to its end."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_child(self) -> int:
        """SIGKILL one pool child (prefork): MainProcess survives and sees WorkerLostError."""
        [child, *_] = self.children()
        os.kill(child, signal.SIGKILL)
        return child

    def kill_group(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no message restored."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        if getattr(self, "_log", None):
            self._log.close()


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private `redis-server` on a spare port, so a test can stop and restart its broker
    without touching the machine's shared one. No persistence: a restart loses every
    message, which is the worst case a broker outage can produce."""

    def __init__(self, port: int | None = None, binary: str = os.environ.get("REDIS_SERVER", "/usr/bin/redis-server")):
        self.port = port or free_port()
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> "RedisServer":
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.ping, timeout=timeout, message=f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: connections drop mid-command and every message in it is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()

    def stop(self) -> None:
        self.kill()


def kill_db_backends(database_url: str) -> int:
    """pg_terminate_backend every other connection to the test database (the worker's and
    this process's pooled ones alike). Returns how many were killed."""
    name = database_url.rsplit("/", 1)[1]
    conn = psycopg2.connect(ADMIN_URL.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


class TaskEvents:
    """Celery task events as Flower sees them (task-received/succeeded/failed/retried...),
    collected on a thread from the broker the worker publishes them to.

    `broker_url` is the broker listened to: it is passed to every connection, since Celery
    lets CELERY_BROKER_URL (set for the whole suite) override an app's own broker setting.
    `type_prefix` keeps only events whose type starts with it ("" keeps worker events too)."""

    def __init__(self, broker_url: str, transport_options: dict[str, Any] | None = None, *,
                 type_prefix: str = "task-") -> None:
        from celery import Celery

        self.broker_url = broker_url
        self.type_prefix = type_prefix
        self.app = Celery("task-events")
        self.app.conf.broker_transport_options = dict(transport_options or {})
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery-events", daemon=True)

    def start(self) -> "TaskEvents":
        self._thread.start()
        if not self._ready.wait(10):
            self.stop()
            raise RuntimeError(f"no event receiver on {self.broker_url} within 10s")
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read(self.broker_url) as conn:
                    self._recv = recv = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                    recv.on_iteration = self._ready.set  # called once subscribed, before each drain
                    recv.should_stop = self._stop.is_set()
                    recv.capture(limit=None, timeout=None, wakeup=False)
            except Exception:  # a broker restart: listen again until stopped
                time.sleep(0.2)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type", "").startswith(self.type_prefix):
            with self._lock:
                self.events.append(event)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def of(self, task_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("uuid") == task_id and (kind is None or e["type"] == kind)]

    def stop(self) -> None:
        self._stop.set()
        if getattr(self, "_recv", None) is not None:
            self._recv.should_stop = True
        self._thread.join(5)


def socket_inodes(pid: int | str = "self") -> tuple[int, set[str]]:
    """(open file descriptors, the inodes of those that are sockets) of a process."""
    inodes: set[str] = set()
    fds = os.listdir(f"/proc/{pid}/fd")
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return len(fds), inodes


def established_to(port: int, pid: int | str = "self", host: str = "127.0.0.1") -> int:
    """A process's ESTABLISHED TCP sockets whose remote end is `host`:`port` (an IPv4
    address): the client ends of its connections to that server, and nothing else's, however
    its ports happen to collide with other servers' (IPv6 ones included)."""
    _, inodes = socket_inodes(pid)
    remote = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"  # /proc's little-endian hex
    with open(f"/proc/{pid}/net/tcp") as rows:
        next(rows)
        return sum(1 for line in rows
                   if (f := line.split())[2] == remote and f[3] == "01" and f[9] in inodes)  # 01: ESTABLISHED


@contextlib.contextmanager
def private_broker():
    """A redis-server of the caller's own, which this process publishes to meanwhile (the
    broker and rate limiter of workers started against it): the suite's shared worker, with
    the default limits, never takes those jobs, nor they the suite's."""
    server = RedisServer().start()
    try:
        with publishing_to(server.url):
            yield server
    finally:
        server.stop()


@contextlib.contextmanager
def publishing_to(broker_url: str):
    """Point this process's Celery app (what the enqueue API publishes with) at another
    broker for the duration, e.g. a private RedisServer that a test stops and restarts.
    The app's own pools are set aside and put back untouched (kombu shares pools between
    equal connections process-wide, so closing them would break every later publish)."""
    from kombu import pools

    from worker.app import app

    saved = (app.conf.broker_url, app.conf.broker_transport_options, app._pool, app.amqp._producer_pool)
    saved_env = os.environ.get("CELERY_BROKER_URL")
    options = {k: v for k, v in (saved[1] or {}).items() if k != "global_keyprefix"}
    os.environ["CELERY_BROKER_URL"] = broker_url  # Celery's conf reads this before broker_url
    app.conf.broker_url, app.conf.broker_transport_options = broker_url, options
    app._pool, app.amqp._producer_pool = None, None
    temporary = app.connection_for_write()
    try:
        yield app
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        for group in (pools.producers, pools.connections):  # the next server may reuse the port
            try:
                del group[temporary]
            except KeyError:
                pass
        app.conf.broker_url, app.conf.broker_transport_options, app._pool, app.amqp._producer_pool = saved
        if saved_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = saved_env


class TcpProxy:
    """A TCP forwarder on a spare port, to put a network between the worker and a server
    and then cut it: `down()` closes every connection and refuses new ones until `up()`."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> "TcpProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
