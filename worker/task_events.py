"""Task events for Flower, sent in batches on a short timer instead of one flush per event.

With an event loop (the threads and prefork pools on Redis), Celery buffers task events
(received, started, succeeded, ...) and publishes the buffer as one `task.multi` message.
But it asks the loop to flush after *every* event, and an event sent from a pool thread
also wakes the loop through its pipe for it: in our worker that was about 1.4 flushes, each a
serialisation and a Redis PUBLISH, per job of 3 events, a twentieth of the worker's CPU
per job at zero PSA latency.

This consumer step stops the per-event flush and flushes every FLUSH_SECONDS from the loop
instead, and before the worker stops. Flower gets the same events, in the same order, in the
same `task.multi` messages it already reads, at most FLUSH_SECONDS later. Celery's own cap
still applies: a buffer that reaches its limit (24 events) is sent at once. Only the
buffering changes: an event that cannot be published (broker away) is kept for the next
connection as before. Worker events (heartbeats, online/offline) were never buffered.
"""
from __future__ import annotations

from typing import Any

from celery import bootsteps

from models import settings

FLUSH_SECONDS = 0.1


def flush_seconds() -> float:
    return max(settings.number("TASK_EVENTS_FLUSH_SECONDS", FLUSH_SECONDS), 0.01)


class BatchedTaskEvents(bootsteps.StartStopStep):
    """Runs after Celery's Events step, which (re)creates the dispatcher at every
    (re)connection: each time, the per-event flush request goes and the timer takes over."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if c.hub is None or dispatcher is None or not dispatcher.buffer_group:
            return  # no event loop: Celery sends each event as it happens
        self._cancel()
        dispatcher.on_send_buffered = None
        self.tref = c.hub.call_repeatedly(flush_seconds(), self._flush, c)

    @staticmethod
    def _flush(c: Any) -> None:
        if c.event_dispatcher is not None:
            c.event_dispatcher.flush()

    def _cancel(self) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def stop(self, c: Any) -> None:
        # Before Celery's Events step closes the dispatcher: what is buffered goes out.
        self._cancel()
        try:
            self._flush(c)
        except Exception:  # the broker is away: the dispatcher keeps what it could not send
            pass

    def shutdown(self, c: Any) -> None:
        self.stop(c)
