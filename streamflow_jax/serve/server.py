"""``streamflow-jax serve`` on one machine: the app under uvicorn, with a draining shutdown.

The first SIGTERM or SIGINT stops accepting connections, lets every request in flight finish
(the device thread drains the engine), and exits 0. A second signal exits at once
(status 128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from streamflow_jax.serve.api import REPLICA_HEADER
from streamflow_jax.serve.realtime import MAX_FRAME_BYTES

HANDLED = (signal.SIGINT, signal.SIGTERM)


def _say(text: str) -> None:
    print(text, flush=True)


def json_400_protocol(base=AutoHTTPProtocol, headers: tuple[tuple[bytes, bytes], ...] = (), on_400=None,
                      header_timeout: float | None = None):
    """``base`` (uvicorn's HTTP protocol) answering malformed HTTP framing (a non-numeric
    Content-Length, a broken request line), which uvicorn's parser rejects before the app sees
    a request, with the API's JSON error instead of uvicorn's plain text: every 4xx of the
    server is ``{"error": {"message", "type", "param", "code"}}``. ``headers`` go on the answer
    (the replica's); ``on_400()`` is called for each (the server's metrics count them). A
    uvicorn whose protocol has no ``send_400_response`` is left as it is.

    ``header_timeout``: a connection whose next request's headers have not all arrived that long
    after it opened or after its last response (it sent nothing, or part of its headers, however
    slowly) is answered 408 in the same JSON and closed. uvicorn arms its keep-alive timeout
    only after a response, and has no timeout for headers: such connections stayed open for
    ever (the app's own deadline covers bodies)."""
    if not callable(getattr(base, "send_400_response", None)):
        return base

    class JSON400Protocol(base):
        def _send_json(self, status: bytes, message: str, code: str) -> None:
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                         "code": code}}).encode()
            lines = [b"HTTP/1.1 " + status]
            lines += [name + b": " + value for name, value in (*self.server_state.default_headers, *headers)]
            lines += [b"content-type: application/json", b"content-length: " + str(len(body)).encode(),
                      b"connection: close"]
            self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            if on_400 is not None:
                on_400()
            self._send_json(b"400 Bad Request", f"malformed HTTP request: {msg}", "malformed_http")

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watchdog = None
            self._quiet_since = self.loop.time()  # no request in progress since (the connection, or a response)
            if header_timeout is not None:
                self._watch(header_timeout)

        def connection_lost(self, exc) -> None:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._quiet_since = self.loop.time()
            super().on_response_complete()

        def _watch(self, delay: float) -> None:
            self._watchdog = self.loop.call_later(delay, self._check_headers)

        def _check_headers(self) -> None:
            """The watchdog: a request being served is left alone; otherwise its headers must have
            come within ``header_timeout`` seconds of the connection or the last response
            (bytes trickling in do not count: a header line every few seconds held it for ever)."""
            self._watchdog = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a WebSocket now
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._watch(header_timeout)
                return
            quiet = self.loop.time() - self._quiet_since
            if quiet < header_timeout:
                self._watch(header_timeout - quiet)
                return
            self._send_json(b"408 Request Timeout", f"no request arrived within {header_timeout:g} s on this "
                                                    "connection (its headers, or any of it)", "timeout")

    JSON400Protocol.__name__ = JSON400Protocol.__qualname__ = f"JSON400{base.__name__}"
    return JSON400Protocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server with this command's signals: drain on the first, exit on the second."""

    def __init__(self, config: uvicorn.Config, on_drain=None):
        super().__init__(config)
        self.on_drain = on_drain

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            os.write(2, f"streamflow-jax serve: second {signal.Signals(sig).name}, exiting now\n".encode())
            os._exit(128 + sig)
        _say(f"streamflow-jax serve: {signal.Signals(sig).name}: draining (finishing the requests in flight; "
             "a second signal exits at once)")
        if self.on_drain is not None:
            self.on_drain()
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server to listen on, or a ValueError naming the
    address (a port in use, a host that does not resolve or is not this machine's), said before
    any model is loaded; uvicorn would log it and exit with its own status instead."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def serve(app, *, host: str = "127.0.0.1", port: int = 8000, name: str = "model", log_level: str = "warning",
          access_log: bool = False, sock: socket.socket | None = None) -> int:
    """Runs ``app`` (from ``create_app``) until a signal; prints ``serving NAME on http://HOST:PORT``
    once it listens and has compiled. Returns the exit status. ``sock``: already bound (``bind``);
    else ``host:port`` is bound here."""
    sock = bind(host, port) if sock is None else sock
    state = app.state.server
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=state.options.timeout + 5,
                            # twice the app's frame limit: a frame over it gets the app's JSON error
                            # and the stream goes on; only one over this closes the socket (1009)
                            ws_max_size=2 * MAX_FRAME_BYTES,
                            http=json_400_protocol(headers=((REPLICA_HEADER.encode(), state.options.replica.encode()),),
                                                   on_400=state.metrics.malformed.inc,
                                                   header_timeout=state.options.timeout))
    server = DrainingServer(config, on_drain=lambda: setattr(state, "draining", True))

    def announce():
        state.worker.ready.wait()
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if state.worker.failed is not None:
            _say(f"streamflow-jax serve: error: the model failed to compile: {state.worker.failed}")
            server.should_exit = True
            return
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else sock.getsockname()[1]
            _say(f"serving {name} on http://{host}:{bound}")

    threading.Thread(target=announce, daemon=True, name="announce").start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
    return 0 if state.worker.failed is None else 1
