"""Prometheus metrics.

Two sources, two processes (both in the Procfile):

- **The worker** counts what happens inside it (writebacks, verification failures, retries,
  PSA call latency, alerts) and serves those on METRICS_PORT (started at worker_init when
  the variable is set). The threads pool is one process, so a plain registry is exact. If
  the worker runs a pool with child processes (-P prefork, or WORKER_POOL=prefork), set
  PROMETHEUS_MULTIPROC_DIR: the children write their samples there and the parent's
  endpoint merges them (prometheus_client multiprocess mode).
- **`python -m worker.metrics`** (`psa-writeback metrics`) serves facts about the whole
  deployment, computed from the database at scrape time: jobs waiting by state, the age of
  the oldest due job, stuck jobs, open alerts, undelivered webhooks, and the broker's queue
  lengths (tasks.sweeper's count). Run one; N workers each exporting the same queue depth
  would be summed wrongly. Port QUEUE_METRICS_PORT, address QUEUE_METRICS_ADDR (or --port/--addr).

Counters are per worker process: aggregate with sum() across workers in PromQL.
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m worker.metrics`: run the importable module, so its
    import sys  # metrics are defined (and registered) once, not once per module copy.

    from worker.metrics import main as _main

    sys.exit(_main())

import argparse
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from models import settings

log = logging.getLogger("psa_writeback.metrics")

NS = "psa_writeback"
WRITEBACKS = Counter(f"{NS}_writebacks", "Writeback jobs that reached a terminal state",
                     ["provider", "kind", "outcome"])
VERIFICATION_FAILURES = Counter(f"{NS}_verification_failures",
                                "Status changes the PSA accepted but the re-read did not show", ["provider", "kind"])
RETRIES = Counter(f"{NS}_retries", "Attempts that failed transiently and were scheduled again",
                  ["provider", "kind", "error_type"])
PSA_LATENCY = Histogram(f"{NS}_psa_request_duration_seconds", "PSA HTTP call latency", ["provider", "operation"],
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
PSA_REQUESTS = Counter(f"{NS}_psa_requests", "PSA HTTP calls by result (2xx, 4xx, 5xx, or the error type)",
                       ["provider", "operation", "result"])
AUTH_FAILURES = Counter(f"{NS}_psa_auth_failures", "Calls a PSA refused because of credentials", ["provider"])
ALERTS = Counter(f"{NS}_alerts_raised", "Alerts raised (deduplicated: one per job and kind)", ["kind"])
ALERT_DELIVERIES = Counter(f"{NS}_alert_webhook_deliveries", "Webhook delivery attempts by result", ["result"])


def label(value: object) -> str:
    return "none" if value is None or value == "" else str(value)


def call_result(status: int | None, error: str | None) -> str:
    if status is not None:
        return f"{status // 100}xx"
    return error or "error"


# --- the worker's own endpoint -------------------------------------------------------------

_server_lock = threading.Lock()
_server_started = False


def worker_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def start_worker_server() -> int | None:
    """Serve this worker's counters on METRICS_PORT (no-op when unset). A port already in
    use is logged, not fatal: metrics must never keep a worker from writing back."""
    global _server_started
    port = os.environ.get("METRICS_PORT", "").strip()
    if not port:
        return None
    with _server_lock:
        if _server_started:
            return int(port)
        try:
            start_http_server(int(port), addr=os.environ.get("METRICS_ADDR", "0.0.0.0"), registry=worker_registry())
        except OSError as err:
            log.error("metrics endpoint not started on port %s: %s", port, err)
            return None
        _server_started = True
    log.info("worker metrics on :%s/metrics", port)
    return int(port)


def clean_multiprocess_dir() -> None:
    """Samples from a previous run would be merged into this one's: start empty."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and os.path.isdir(path):
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))


# --- deployment-wide gauges, from the database at scrape time ------------------------------

class QueueCollector(Collector):
    """Reads the job and alert tables on each scrape (a handful of indexed aggregates)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(f"{NS}_metrics_db_up", "1 if the last scrape could read the database")
        try:
            families = list(self._from_db())
        except Exception as err:  # a scrape must answer even when the database does not
            log.warning("metrics scrape could not read the database: %s", type(err).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        yield from self._broker()

    def _from_db(self) -> Iterator[GaugeMetricFamily]:
        snap = queue_snapshot()
        depth = GaugeMetricFamily(f"{NS}_queue_depth", "Jobs not finished, by state", labels=["state"])
        for state in ("queued", "retrying", "running"):
            depth.add_metric([state], snap.depth.get(state, 0))
        yield depth
        yield GaugeMetricFamily(f"{NS}_oldest_due_job_age_seconds",
                                "How long the oldest due (queued or retrying) job has been waiting to start",
                                value=snap.oldest_due_age)
        yield GaugeMetricFamily(f"{NS}_stuck_jobs", "Jobs due (or lease expired) longer than STUCK_AFTER_SECONDS",
                                value=snap.stuck)
        open_alerts = GaugeMetricFamily(f"{NS}_open_alerts", "Alerts not resolved, by kind", labels=["kind"])
        for kind, count in sorted(snap.open_alerts.items()):
            open_alerts.add_metric([kind], count)
        yield open_alerts
        yield GaugeMetricFamily(f"{NS}_alert_webhooks_pending", "Alerts whose webhook is not delivered yet",
                                value=snap.webhooks_pending)

    def _broker(self) -> Iterator[GaugeMetricFamily]:
        from tasks.sweeper import broker_queue_lengths  # the sweeper's count: every priority list

        try:
            lengths = broker_queue_lengths("writeback", "drafting")
        except Exception as err:
            log.warning("metrics scrape could not read the broker: %s", type(err).__name__)
            return
        length = GaugeMetricFamily(f"{NS}_broker_queue_length", "Messages waiting in the broker queue",
                                   labels=["queue"])
        for queue, count in lengths.items():
            length.add_metric([queue], count)
        yield length


# --- the database read behind the deployment gauges -----------------------------------------

@dataclass
class QueueSnapshot:
    depth: dict[str, int] = field(default_factory=dict)
    oldest_due_age: float = 0.0
    stuck: int = 0
    open_alerts: dict[str, int] = field(default_factory=dict)
    webhooks_pending: int = 0


def queue_snapshot() -> QueueSnapshot:
    from sqlalchemy import func, select

    from models import Alert, AlertKind, DeliveryState, WritebackJob, utcnow
    from models.db import session_scope
    from worker.stuck import CLAIMABLE, TERMINAL, stuck_condition

    J, now = WritebackJob, utcnow()
    snap = QueueSnapshot()
    with session_scope() as db:
        snap.depth = dict(db.execute(select(J.state, func.count()).where(J.state.notin_(TERMINAL))
                                     .group_by(J.state)).all())
        oldest = db.scalar(select(func.min(J.next_attempt_at)).where(J.state.in_(CLAIMABLE), J.next_attempt_at <= now))
        if oldest is not None:
            snap.oldest_due_age = max(0.0, (now - oldest).total_seconds())
        snap.stuck = db.scalar(select(func.count()).select_from(J).where(stuck_condition(now))) or 0
        snap.open_alerts = {k.value: 0 for k in AlertKind}
        snap.open_alerts.update(db.execute(select(Alert.kind, func.count()).where(Alert.resolved_at.is_(None))
                                           .group_by(Alert.kind)).all())
        snap.webhooks_pending = db.scalar(select(func.count()).select_from(Alert)
                                          .where(Alert.delivery_state == DeliveryState.PENDING.value)) or 0
    return snap


def serve(port: int, addr: str = "0.0.0.0") -> None:
    registry = CollectorRegistry()
    registry.register(QueueCollector())
    start_http_server(port, addr=addr, registry=registry)
    log.info("deployment metrics on %s:%s/metrics", addr, port)
    print(f"psa-writeback metrics on http://{addr}:{port}/metrics", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psa-writeback metrics", description="Serve queue metrics from the database.")
    parser.add_argument("--port", type=int, default=settings.integer("QUEUE_METRICS_PORT", 9809, positive=True))
    # All interfaces by default: Prometheus scrapes from another host or container. The
    # gauges are counts (no tenant data), but set QUEUE_METRICS_ADDR (or --addr) to bind one
    # interface where the port is reachable from places that should not see them.
    parser.add_argument("--addr", default=os.environ.get("QUEUE_METRICS_ADDR", "").strip() or "0.0.0.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(args.port, args.addr)
    return 0

