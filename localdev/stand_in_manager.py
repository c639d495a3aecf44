"""A small stand-in for integration-manager's refresh endpoint, for the demo and the tests.

It answers `POST /api/v1/integrations/{integrationId}/connections/{connectionId}/refresh`:
- by default with 200 and a new `expiresAt`; with a Cosmos container it also "refreshes" the
  connection by moving `oauth.expiresAt` forward (and writing new token values) in the document;
- with whatever a `script(call) -> Answer` callable decides, for scripted failures in tests
  (a JSON body, or `raw_body` bytes as they are: HTML pages, text, truncated JSON; or no answer at all).
  A scripted 200 refreshes the document too, unless it says `keep_document`.
Every call is recorded (path, decoded ids, headers, body), and accepted sockets are counted. With an
`ssl_context` it serves HTTPS (e.g. with a self-signed certificate, to test TLS verification).
Each call also records when it arrived, the status actually delivered (None: no answer reached the
client) and, when it refreshed a Cosmos document, the `expiresAt` it moved from and to.
`refuse_connections()` / `accept_connections()` close and reopen the port (an outage of the service).
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 refuses a burst of concurrent connects; real servers take more.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its read timeout) resets the connection: expected, not worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


PATH_PREFIX = "/api/v1/integrations/"


@dataclass
class Call:
    raw_path: str
    integration_id: str | None
    connection_id: str | None
    headers: dict[str, str]
    body: Any
    received_at: float = field(default_factory=time.monotonic)
    status: int | None = None  # the status answered; None if no answer could be written (client gone)
    refreshed_from: Any = None  # the document's oauth.expiresAt before this call refreshed it
    refreshed_to: str | None = None  # ... and after (None: this call did not refresh the document)
    finished_at: float | None = None  # when the manager was done with it (answered, or gave up answering)

    @property
    def refreshed(self) -> bool:
        return self.refreshed_to is not None


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw_body: bytes | None = None  # sent as is instead of `body` as JSON (HTML error pages, text, ...)
    content_type: str = "application/json"
    drop_connection: bool = False  # close the connection without answering
    refresh_anyway: bool = False  # refresh (with a container), then answer this: a gateway's 504 after the work
    keep_document: bool = False  # a 200 that does not refresh: a failure body, or a manager that says 200 and lies


def parse_refresh_path(raw_path: str) -> tuple[str, str] | None:
    """The two ids of a well-formed refresh path (each exactly one encoded segment), else None."""
    if not raw_path.startswith(PATH_PREFIX) or "?" in raw_path:
        return None
    parts = raw_path[len(PATH_PREFIX) :].split("/")
    if len(parts) != 4 or parts[1] != "connections" or parts[3] != "refresh":
        return None
    return unquote(parts[0]), unquote(parts[2])


class StandInManager:
    def __init__(
        self,
        script: Callable[[Call], Answer] | None = None,
        container: Any = None,
        token_lifetime: timedelta = timedelta(hours=1),
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ):
        self.script = script
        self.container = container
        self.token_lifetime = token_lifetime
        self.calls: list[Call] = []
        self.sockets_accepted = 0
        self._lock = threading.Lock()
        self._open_sockets: set[Any] = set()
        manager = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real API behind a load balancer
            # Headers and body in one segment, sent at once: otherwise delayed ACKs add ~40 ms a call.
            wbufsize = 64 * 1024
            disable_nagle_algorithm = True

            def setup(self) -> None:
                with manager._lock:
                    manager.sockets_accepted += 1
                    manager._open_sockets.add(self.request)
                super().setup()

            def finish(self) -> None:
                with manager._lock:
                    manager._open_sockets.discard(self.request)
                with contextlib.suppress(OSError):  # the client went away (or the port closed) before a flush
                    super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                ids = parse_refresh_path(self.path)
                call = Call(self.path, ids[0] if ids else None, ids[1] if ids else None, dict(self.headers), body)
                with manager._lock:
                    manager.calls.append(call)
                answer = manager.answer(call) if ids else Answer(404, {"error": "not_found"})
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                call.finished_at = time.monotonic()
                if answer.drop_connection:
                    self.close_connection = True
                    return
                if answer.raw_body is not None:
                    payload = answer.raw_body
                else:
                    payload = b"" if answer.body is None else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(payload)
                    self.wfile.flush()
                except OSError:  # the client gave up (read timeout) or is gone: nothing was delivered
                    self.close_connection = True
                    return
                call.status = answer.status

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server((host, port), Handler)
        self._server.daemon_threads = True
        if ssl_context is not None:
            # The TLS handshake runs on accept: a client that rejects the certificate never gets to send
            # a request (nothing is recorded, no socket is counted).
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="stand-in-manager", daemon=True
        )

    def answer(self, call: Call) -> Answer:
        """The scripted answer. A 2xx refreshes the document first (with a container), as the real manager does,
        unless it says `keep_document` (a 200 that reports a failure, or a manager that answers 200 and does
        nothing); another status refreshes only with `refresh_anyway`. A 2xx without a scripted body answers the
        new expiry."""
        answer = self.script(call) if self.script is not None else Answer()
        success = 200 <= answer.status < 300
        writes = (success and not answer.keep_document) or answer.refresh_anyway
        refreshed = self._refresh_in_cosmos(call) if writes else None
        if not success or refreshed is None:
            return answer
        if refreshed.status != 200:
            return refreshed  # its own store is down
        if answer.body is not None or answer.raw_body is not None:
            return answer
        # How the script answers (late, with headers, not at all) applies to the refresh too.
        return replace(
            refreshed, headers=answer.headers, delay_s=answer.delay_s, drop_connection=answer.drop_connection
        )

    def _refresh_in_cosmos(self, call: Call) -> Answer:
        new_expiry = datetime.now(UTC) + self.token_lifetime
        expires_at = new_expiry.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.container is not None:
            from azure.core.exceptions import AzureError

            tenant_id = (call.body or {}).get("tenantId") if isinstance(call.body, dict) else None
            try:
                document = self.container.read_item(call.connection_id, partition_key=tenant_id)
                previous = document["oauth"].get("expiresAt")
                stamp = int(time.time() * 1000)
                document["oauth"].update(
                    expiresAt=expires_at,
                    accessToken=f"access-refreshed-{stamp}",
                    refreshToken=f"refresh-refreshed-{stamp}",
                )
                self.container.replace_item(document["id"], document)
            except AzureError:  # its own store is down: a real integration-manager answers 503
                return Answer(503, {"error": "store_unavailable"})
            call.refreshed_from, call.refreshed_to = previous, expires_at
        return Answer(200, {"connectionId": call.connection_id, "expiresAt": expires_at})

    def start(self) -> StandInManager:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def refuse_connections(self) -> None:
        """Close the port, and every open connection: new calls are refused, as when the service is down."""
        self.stop()
        with self._lock:
            sockets = list(self._open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def accept_connections(self) -> None:
        """Listen again on the same port (and scheme) after refuse_connections()."""
        old = self._server
        self._server = _Server(old.server_address, old.RequestHandlerClass)
        self._server.daemon_threads = True
        if isinstance(old.socket, ssl.SSLSocket):
            self._server.socket = old.socket.context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="stand-in-manager", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> StandInManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m localdev.stand_in_manager`: serve until Ctrl-C, refreshing in the app's Cosmos container."""
    import argparse

    from localdev.cli import load_local_settings
    from localdev.errors import ServiceError
    from localdev.failures import report_failures
    from localdev.sample_data import REJECTED_CONNECTIONS, open_container
    from shared.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m localdev.stand_in_manager", description=main.__doc__)
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    loaded: list[Any] = []  # the settings, once read: the error line's scrubber uses them

    def serve() -> int:
        load_local_settings()
        loaded.append(load_settings())
        container = open_container(loaded[0])
        rejected = Answer(400, {"error": "invalid_grant"})
        try:
            server = StandInManager(
                script=lambda call: rejected if call.connection_id in REJECTED_CONNECTIONS else Answer(),
                container=container,
                port=args.port,
            ).start()
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise ServiceError(
                "the stand-in integration-manager cannot listen: the port is in use",
                f"127.0.0.1:{args.port}, --port",
                "stop what listens there (an earlier stand-in?) or pass another --port and point "
                "INTEGRATION_MANAGER_URL at it",
            ) from None
        print(
            f"stand-in integration-manager on {server.url} "
            f"(rejects {', '.join(sorted(REJECTED_CONNECTIONS))}); Ctrl-C stops"
        )
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            server.stop()
            print(f"stopped after {len(server.calls)} call(s)")
        return 0

    return report_failures(serve, lambda: loaded[0] if loaded else None, debug=False)


if __name__ == "__main__":
    import sys

    sys.exit(main())
