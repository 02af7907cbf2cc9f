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

And two below the ASGI app, in uvicorn's HTTP protocol (``HeaderGuard``): a connection whose
request line and headers are not complete within ``header_timeout`` seconds of its opening, or of
the previous response, is closed (slowloris: uvicorn itself waits for them forever); and a request
line + headers over uvicorn's ``h11_max_incomplete_event_size`` bytes is answered 431 and closed
(h11 applies that limit only to headers that arrive in several reads).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from magi.serve.protocol import error_response

HEADER_TIMEOUT_S = 10.0
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line after the headers, as h11 finds it
logger = logging.getLogger(__name__)

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


class HeaderGuard(H11Protocol):
    """uvicorn's h11 protocol with a deadline and a size cap for each request's line and headers
    (a subclass made by :func:`http_protocol` sets ``header_timeout``). The clock starts when the
    connection opens or a response ends, and data arriving does not restart it: a client that
    sends a byte now and then is closed like one that sends nothing. A request's body and a
    response are not timed (uploads and live streams may take long)."""

    header_timeout = HEADER_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._stop_clock()
            body = json.dumps(
                {
                    "error": {
                        "message": "the request line and headers are over "
                        f"{self._max_head() // 1024} KB; send fewer or shorter headers",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "headers_too_large",
                    }
                }
            )
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body.encode())
            )
            self.transport.close()
            return
        super().data_received(data)

    def _max_head(self) -> int:
        return self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the request head being received (h11's unread bytes + ``data``) is over the cap."""
        limit = self._max_head()
        head = (self.conn.trailing_data[0] + data)[: limit + 3]
        end = _HEAD_END.search(head)
        return len(head) > limit if end is None else end.end() > limit

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Run the clock while the connection waits for a request's headers, else stop it."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)
        elif not waiting:
            self._stop_clock()

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closing %s: no complete request headers within %g s", self.client, self.header_timeout)
            self.transport.close()


def http_protocol(header_timeout: float) -> type[HeaderGuard]:
    """The protocol class to pass uvicorn as ``http=``: request headers get ``header_timeout`` s."""
    return type("HeaderGuard", (HeaderGuard,), {"header_timeout": float(header_timeout)})
