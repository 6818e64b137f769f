"""The reference ceiling for the throughput benchmark: a minimal Celery task that makes the
same five HTTP calls to the simulator as a resolve job, plus one UPDATE, and nothing else
(no claim, no attempt rows, no verification logic, no error handling)."""
from __future__ import annotations

import base64
import os
import threading
import time

import psycopg2.pool
import requests
from celery import Celery
from requests.adapters import HTTPAdapter

app = Celery("bench_reference", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True, task_acks_late=True,
                worker_prefetch_multiplier=1, task_default_queue="bench_ref",
                broker_transport_options={"global_keyprefix": os.environ.get("CELERY_REDIS_KEY_PREFIX", "")})

_local = threading.local()
_pool: psycopg2.pool.ThreadedConnectionPool | None = None
_lock = threading.Lock()
_session = requests.Session()
_session.mount("http://", HTTPAdapter(pool_maxsize=64))
_HEADERS = {
    "Authorization": "Basic " + base64.b64encode(b"simco+fake-public:fake-private").decode(),
    "clientId": "00000000-0000-0000-0000-00000000c11e",
    "Accept": "application/vnd.connectwise.com+json; version=2025.16",
}


def _db() -> psycopg2.pool.ThreadedConnectionPool:
    global _pool
    with _lock:
        if _pool is None:
            _pool = psycopg2.pool.ThreadedConnectionPool(1, 40, os.environ["BENCH_DSN"])
        return _pool


@app.task(name="bench.reference")
def reference(n: int, base_url: str, ticket_id: int) -> None:
    started = time.time()
    t = f"{base_url}/service/tickets/{ticket_id}"
    _session.get(t + "/notes", headers=_HEADERS, params={"orderBy": "id desc", "pageSize": 50}, timeout=30)
    _session.post(t + "/notes", headers=_HEADERS, json={"text": f"ref {n}", "resolutionFlag": True}, timeout=30)
    _session.get(t, headers=_HEADERS, timeout=30)
    _session.patch(t, headers=_HEADERS, json=[{"op": "replace", "path": "status/id", "value": 9}], timeout=30)
    _session.get(t, headers=_HEADERS, timeout=30)
    pool = _db()
    conn = pool.getconn()
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE bench_ref SET started_at = to_timestamp(%s), done_at = clock_timestamp() "
                        "WHERE id = %s", (started, n))
        conn.commit()
    finally:
        pool.putconn(conn)
