"""``streamflow-jax serve`` on one machine: the app under uvicorn, with a draining shutdown.

The first SIGTERM or SIGINT stops accepting connections, lets every request in flight finish
(the device thread drains the engine), and exits 0. A second signal exits at once
(status 128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import uvicorn

from streamflow_jax.serve.realtime import MAX_FRAME_BYTES

HANDLED = (signal.SIGINT, signal.SIGTERM)


def _say(text: str) -> None:
    print(text, flush=True)


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


def serve(app, *, host: str = "127.0.0.1", port: int = 8000, name: str = "model", log_level: str = "warning",
          access_log: bool = False) -> int:
    """Runs ``app`` (from ``create_app``) until a signal; prints ``serving NAME on http://HOST:PORT``
    once it listens and has compiled. Returns the exit status."""
    state = app.state.server
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=state.options.timeout + 5,
                            # twice the app's frame limit: a frame over it gets the app's JSON error
                            # and the stream goes on; only one over this closes the socket (1009)
                            ws_max_size=2 * MAX_FRAME_BYTES)
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
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
            _say(f"serving {name} on http://{host}:{bound}")

    threading.Thread(target=announce, daemon=True, name="announce").start()
    server.run()
    sys.stdout.flush()
    return 0 if state.worker.failed is None else 1
