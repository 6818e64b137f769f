"""Vendor simulators: real HTTP servers on loopback with fault injection."""
from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server that serves from a daemon thread: `start()`, then `stop()`."""

    daemon_threads = True
    thread_name = "simulator"
    _thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def serve_until_interrupted(self) -> None:
        """Serve in the foreground (the `python -m ...` entry points) until Ctrl-C."""
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
