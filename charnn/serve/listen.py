"""Running charnn serve: a bound socket, and uvicorn on it until Ctrl-C or
SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable

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


def is_loopback(address: str) -> bool:
    """Only this machine can reach ``address`` (127.0.0.0/8, ::1)."""
    import ipaddress

    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


REFUSED = "too many open connections to this server; retry in a second"
MALFORMED = "the request is not valid HTTP/1.1; check its request line, headers and body framing"
SLOW = "the request's headers did not arrive in time; send the whole request at once"
CUT_FLUSH = 1.0  # seconds cut streams get to send their error event before their connections are closed
RESERVED_FILES = 64  # file descriptors kept free for the server's own use (pipes, the page, torch)
# Kernel send buffer per connection (Linux doubles it). Autotuned, it grows to
# 4 MB, which a client that does not read fills before the server notices;
# 128 kB still streams text far faster than any model makes it.
SEND_BUFFER = 128 * 1024


def _raw_reply(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "status": status}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nretry-after: 1\r\n\r\n").encode() + body


def connection_limit(wanted: int) -> int:
    """``wanted`` open connections, or fewer where the open-files limit
    (``ulimit -n``) would run out first: each connection is a file, and a
    server out of files can accept nobody, not even to say 503. Raises the
    soft limit to the hard one first."""
    try:
        import resource
    except ImportError:  # not a Unix
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    return max(1, min(wanted, soft - in_use - RESERVED_FILES))


def protocol_class(max_connections: int, client_timeout: float) -> type:
    """uvicorn's h11 protocol with three bounds it lacks: open connections
    (past ``max_connections``, a new one is answered 503 and closed at once),
    the time a client may take to send a request's headers, and the time a
    reply may wait for a client that does not read (its connection is then
    dropped, which frees the stream's place in the batch)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _headers_timer: Any = None
        _write_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_raw_reply(503, "Service Unavailable", REFUSED))
                transport.close()
                return
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                except OSError:
                    pass
            self._wait_for_headers()

        def _wait_for_headers(self) -> None:
            self._stop(self._headers_timer)
            self._headers_timer = self.loop.call_later(client_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.write(_raw_reply(408, "Request Timeout", SLOW))
                self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers arrived
                self._headers_timer = self._stop(self._headers_timer)

        def send_400_response(self, msg: str) -> None:
            # uvicorn's own 400 goes through h11, which refuses it once a reply
            # has begun or been sent (a traceback), and is plain text.
            import h11

            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not (
                    self.cycle is not None and self.cycle.response_started):
                self.transport.write(_raw_reply(400, "Bad Request", MALFORMED))
            self.transport.close()  # a reply under way cannot be finished on a connection out of step

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
                self._wait_for_headers()  # of the next request on this connection

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(client_timeout, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._write_timer = self._stop(self._write_timer)

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_timer = self._stop(self._headers_timer)
            self._write_timer = self._stop(self._write_timer)
            super().connection_lost(exc)

        @staticmethod
        def _stop(timer: Any) -> None:
            if timer is not None:
                timer.cancel()
            return None

    return GuardedH11


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback each time accept() fails for want of files;
    say it once a minute, in one line."""
    last = [-1e9]
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "out of system resource" in str(context.get("message", "")):
            now = time.monotonic()
            if now - last[0] > 60:
                last[0] = now
                logging.getLogger("uvicorn.error").warning(
                    "out of open files: new connections wait (raise ulimit -n, or lower --max-connections)")
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def run(app: Any, sock: socket.socket, grace: float = 10.0, log_level: str = "warning",
        announce: Callable[[], None] | None = None) -> str | None:
    """Serve ``app`` on ``sock`` until Ctrl-C or SIGTERM. Then: stop accepting,
    let in-flight streams finish for ``grace`` seconds, end the rest with an
    ``error`` event, and return the signal's name (None if it stopped
    otherwise). A second Ctrl-C ends the streams at once, with the same event.
    ``announce`` runs once the signals are handled: a SIGTERM sent as soon as
    the address is announced stops the server cleanly instead of killing it."""
    require_extra()
    import uvicorn

    server_state: Server = app.state.server
    limits = server_state.limits
    received: list[int] = []
    cut_message = "the server is shutting down; this stream was cut short"

    class _Uvicorn(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None
        cut = False

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            _quiet_accept_errors(self.loop)
            await super().startup(sockets)
            if announce is not None:
                announce()  # uvicorn's serve() installed its signal handlers before startup

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises the signal after a graceful exit (killing the
            # process with SIGTERM's default action); here stopping *is* the
            # expected behaviour, so only record it.
            received.append(sig)
            if self.should_exit and sig == signal.SIGINT and self.loop is not None:
                if self.cut:
                    self.force_exit = True  # a third Ctrl-C: leave now
                else:
                    self.loop.call_soon_threadsafe(self.cut_streams)
            else:
                self.should_exit = True

        def cut_streams(self) -> None:
            """End every stream with an error event, then close what is still open."""
            if self.cut:
                return
            self.cut = True
            server_state.cancel_streams(cut_message)
            assert self.loop is not None
            self.loop.call_later(CUT_FLUSH, self.close_connections)

        def close_connections(self) -> None:
            for connection in list(self.server_state.connections):
                connection.transport.abort()  # a stalled client's reply cannot be finished

        async def shutdown(self, sockets: Any = None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace, self.cut_streams)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    # The batch thread releases the GIL inside each torch op and needs it back
    # right after; a short switch interval keeps the HTTP thread from holding
    # it for the default 5 ms at a time (measured: steps ~2x slower under load).
    sys.setswitchinterval(0.0005)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace + CUT_FLUSH + 5,
                            lifespan="on", access_log=False, server_header=False,
                            http=protocol_class(connection_limit(limits.max_connections), limits.client_timeout),
                            timeout_keep_alive=min(5, limits.client_timeout))
    _Uvicorn(config).run(sockets=[sock])
    return signal.Signals(received[-1]).name if received else None
