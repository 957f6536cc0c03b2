"""Running charnn serve: a bound socket, and uvicorn on it until Ctrl-C or
SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any

from .api import ServeError, require_extra
from .app import Server


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or a :class:`ServeError` that says what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot use host {host!r} ({e.strerror}); pass --host 127.0.0.1 or an address "
                         "of this machine") from None
    family, kind, proto, _, addr = infos[0]
    # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on each
    # connection; without it each small SSE write waits for the client's
    # delayed ACK of the one before (40 ms on Linux).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                         "(or stop what is using it)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(app: Any, sock: socket.socket, grace: float = 10.0, log_level: str = "warning") -> str | None:
    """Serve ``app`` on ``sock`` until Ctrl-C or SIGTERM. Then: stop accepting,
    let in-flight streams finish for ``grace`` seconds, end the rest with an
    ``error`` event, and return the signal's name (None if it stopped otherwise)."""
    require_extra()
    import uvicorn

    server_state: Server = app.state.server
    received: list[int] = []

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises the signal after a graceful exit (killing the
            # process with SIGTERM's default action); here stopping *is* the
            # expected behaviour, so only record it.
            received.append(sig)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace, server_state.cancel_streams,
                                    "the server is shutting down; this stream was cut short")
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    # The batch thread releases the GIL inside each torch op and needs it back
    # right after; a short switch interval keeps the HTTP thread from holding
    # it for the default 5 ms at a time (measured: steps ~2x slower under load).
    sys.setswitchinterval(0.0005)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace + 5, lifespan="on",
                            access_log=False)
    _Uvicorn(config).run(sockets=[sock])
    return signal.Signals(received[-1]).name if received else None
