"""What keeps ``magi serve`` safe without an API key: an ASGI middleware in front of every route.

- Host allow-list (DNS rebinding): a request's ``Host`` must be ``localhost``, a loopback address,
  the bound address (any IP address when bound to all of them: a rebinding attack needs a name),
  or one of ``--allowed_hosts`` (``*``: any). Else 421.
- Origin check (cross-site requests): a browser's unsafe request (POST, PUT, PATCH, DELETE) whose
  ``Origin`` is not the server's own (``http://`` + its Host) is refused with 403 unless the API
  key is set and sent; clients that send no ``Origin`` (curl, the SDKs) are not affected.
- With an API key, the API docs (``/docs``, ``/redoc``, ``/openapi.json``) need the key too.
- WebSocket handshakes (the realtime route): the same Host rule, and without a key the same
  Origin rule (a cross-site page cannot open a session); refused with 403.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from magi.serve.protocol import error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})

Scope = dict[str, Any]
App = Callable[[Scope, Callable, Callable], Awaitable[None]]


def _split_host(value: str) -> str:
    """``host[:port]`` / ``[v6]:port`` -> the host, lower case, without brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


class Guard:
    """The ASGI middleware; ``bound``: the address the server listens on."""

    def __init__(self, app: App, *, bound: str, allowed_hosts: Iterable[str] = (), api_key: str | None = None) -> None:
        self.app, self.api_key = app, api_key
        self.allowed = {_split_host(h) for h in allowed_hosts if h.strip()}
        self.bound = _split_host(bound)
        bound_ip = _ip(self.bound)
        self.any_ip = bound_ip is not None and bound_ip.is_unspecified  # 0.0.0.0 / ::

    def host_ok(self, host: str) -> bool:
        if "*" in self.allowed or host in _LOOPBACK_NAMES or host == self.bound or host in self.allowed:
            return True
        ip = _ip(host)
        return ip is not None and (ip.is_loopback or self.any_ip)

    def _has_key(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), (self.api_key or "").encode())

    def refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, code, message) when the request must be refused, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.host_ok(_split_host(host)):
            return (
                421,
                "host_not_allowed",
                (f"Host {host[:80]!r} is not this server's; start it with --allowed_hosts NAME to serve that name"),
            )
        keyed = bool(self.api_key) and self._has_key(headers)
        if self.api_key and scope["path"] in DOC_PATHS and not keyed:
            return 401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'"
        origin = headers.get("origin")
        cross_site = headers.get("sec-fetch-site") == "cross-site"
        if (
            scope["method"] not in SAFE_METHODS
            and not keyed
            and (
                cross_site
                or (origin is not None and origin.lower() not in (f"http://{host.lower()}", f"https://{host.lower()}"))
            )
        ):
            return (
                403,
                "cross_origin",
                (
                    f"a {scope['method']} from the web page {origin or 'of another site'} is "
                    "refused; use this server's own page, or set --api_key and send it"
                ),
            )
        return None

    def ws_refused(self, scope: Scope) -> bool:
        """A WebSocket handshake to refuse: a foreign Host, or (without a key, which the realtime
        route checks itself) a browser's Origin other than the server's own."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.host_ok(_split_host(host)):
            return True
        origin = headers.get("origin")
        return (
            not self.api_key
            and origin is not None
            and origin.lower() not in (f"http://{host.lower()}", f"https://{host.lower()}")
        )

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket" and self.ws_refused(scope):
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # the handshake is answered 403
            return
        if scope["type"] == "http":
            refused = self.refusal(scope)
            if refused is not None:
                status, code, message = refused
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                await error_response(status, code, message, None, headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
