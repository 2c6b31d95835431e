"""A webhook receiver on loopback for the HTTP sink's tests: it checks each POST's signature,
records every CloudEvent it takes, and can be taken down, brought back, or made to refuse."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from metering.export.http import CONTENT_TYPE, SIGNATURE_HEADER, verify

from .processes import free_port


class WebhookReceiver:
    """`events` holds every event taken, in order (a duplicate shows as a second copy);
    `bad_signatures` counts POSTs refused for their signature; `refuse` POSTs are answered 503
    before any is taken."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.port = free_port()
        self.events: list[dict] = []
        self.bad_signatures = 0
        self.refuse = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver.take(body, self.headers.get(SIGNATURE_HEADER, ""), self.headers)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        return Handler

    def take(self, body: bytes, signature: str, headers: object) -> int:
        with self._lock:
            if self.refuse > 0:
                self.refuse -= 1
                return 503
            if not verify(self.secret, signature, body, time.time()):
                self.bad_signatures += 1
                return 401
            if headers.get("content-type") != CONTENT_TYPE:  # type: ignore[attr-defined]
                return 415
            self.events.extend(json.loads(body))
            return 200

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (a POST then finds the port closed)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        with self._lock:
            return [event["id"] for event in self.events]
