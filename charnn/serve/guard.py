"""charnn serve against the network: which Host names it answers (DNS
rebinding), which web pages may POST to it (Origin), the headers that keep
its page from being framed or sniffed, and a uvicorn protocol that bounds open
connections and how long a client may take (see docs/serve-security.md).

Library code: it prints nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from base64 import b64encode
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` or ``[v6]:port`` as (lower-case name, port), or None if malformed."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\[\]:/@\s]*)(?::(\d{1,5}))?", value)
    if m is None:
        return None
    name = m.group(1).strip("[]").lower().rstrip(".")
    return name, int(m.group(2)) if m.group(2) else None


class HostRules:
    """The Host names this server answers: the loopback names (``localhost``
    and ``*.localhost``, 127.0.0.0/8, ::1), the address it is bound to, and
    ``allow`` (``--allow-host``). Bound to every address (0.0.0.0 or ::), it
    also answers any IP address: a DNS rebinding attack needs a name it
    controls, and a literal address is no such name."""

    def __init__(self, bound: str | None = None, allow: Iterable[str] = ()):
        self.bound = (bound or "").strip("[]").lower()
        self.any_ip = self.bound in WILDCARDS and bound is not None
        self.names = {n.lower().rstrip(".") for n in LOOPBACK_NAMES}
        if self.bound and not self.any_ip:
            self.names.add(self.bound)
        self.allow = [self._allowed_name(a) for a in allow]
        self.names.update(self.allow)

    @staticmethod
    def _allowed_name(value: str) -> str:
        """The host name of an ``--allow-host`` value; a port is dropped, as Host headers' ports are not checked."""
        from .api import ServeError

        parts = split_host(value.strip())
        if parts is None or not parts[0] or "*" in parts[0]:
            raise ServeError(f"--allow-host {json.dumps(value)} is not a host name; give a name such as "
                             "charnn.example.org (with an optional :port), once per name (there is no wildcard)")
        return parts[0]

    def allows(self, name: str) -> bool:
        if name in self.names or name.endswith(".localhost"):
            return True
        ip = _ip(name)
        if ip is not None:
            return ip.is_loopback or self.any_ip
        return False

    def describe(self) -> str:
        extra = sorted(self.names - {n for n in LOOPBACK_NAMES})
        return ", ".join(["localhost", "127.0.0.1", "[::1]"] + extra + (["any IP address"] if self.any_ip else []))


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def csp_for(page: str) -> str:
    """A Content-Security-Policy for the one-file page: its own inline script
    and style (by hash) and requests to this server only."""
    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join(f"'sha256-{b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


SAFE_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                (b"referrer-policy", b"no-referrer")]


class Guard:
    """ASGI middleware in front of the app: a request whose Host is not
    allowed gets 421; a POST from a web page of another origin gets 403 (a
    request without Origin comes from a program, not a browser, and passes).
    Every reply gets :data:`SAFE_HEADERS`; the page also its CSP."""

    def __init__(self, app: Any, rules: HostRules, page_csp: str):
        self.app = app
        self.rules = rules
        self.page_csp = page_csp.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.check(scope)
        headers = SAFE_HEADERS + [(b"content-security-policy",
                                   self.page_csp if scope.get("path") == "/" else b"default-src 'none'; "
                                   b"frame-ancestors 'none'")]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + headers}
            await send(message)

        if refusal is not None:
            status, text = refusal
            body = json.dumps({"error": {"message": text, "status": status}}).encode()
            await send_with_headers({"type": "http.response.start", "status": status,
                                     "headers": [(b"content-type", b"application/json"),
                                                 (b"content-length", str(len(body)).encode())]})
            await send_with_headers({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send_with_headers)

    def check(self, scope: dict) -> tuple[int, str] | None:
        """(status, message) for a request to refuse, else None."""
        host = _header(scope, b"host")
        if host is not None:  # HTTP/1.1 always has one (h11 insists); a bare HTTP/1.0 client is not a browser
            parts = split_host(host)
            if parts is None or not self.rules.allows(parts[0]):
                shown = json.dumps(host[:100])
                return 421, (f"this server does not answer to the host name {shown} (it answers "
                             f"{self.rules.describe()}); if you reach it by that name on purpose, start it "
                             f"with --allow-host {parts[0] if parts and parts[0] else 'NAME'}")
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
            origin = _header(scope, b"origin")
            if origin is not None and not self.same_origin(origin, host):
                return 403, (f"a web page at {json.dumps(origin[:100])} may not use this server; only its own "
                             "page may (programs send no Origin header)")
        return None

    def same_origin(self, origin: str, host: str | None) -> bool:
        """The page that sent the request is this server's own: its origin's
        name and port are the Host's (default ports from the origin's scheme)."""
        try:
            o = urlsplit(origin)
            o_name, o_port = (o.hostname or "").rstrip("."), o.port
        except ValueError:
            return False
        if o.scheme not in ("http", "https") or not o_name or host is None:
            return False
        default = 443 if o.scheme == "https" else 80
        parts = split_host(host)
        if parts is None:
            return False
        return (o_name, o_port or default) == (parts[0], parts[1] or default) and self.rules.allows(o_name)
