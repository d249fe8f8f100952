"""What `crosssite serve` adds to uvicorn's HTTP handling: a deadline on reading a request's headers, and the
listening socket bound before the model loads.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a connection that sends part of
a request line or of its headers and then nothing more stays open for ever (its keep-alive timer is cancelled
as soon as any byte arrives). `HeaderTimeoutProtocol` gives every connection ``header_timeout_s`` from its start
(and from the end of each response) to deliver a complete request head, and closes it otherwise; the request
body and the scoring are bounded by the service's request timeout instead.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

from crosssite.errors import CrossSiteError

__all__ = ["HEADER_TIMEOUT_S", "HeaderTimeoutProtocol", "ServeStartError", "bind_socket", "header_timeout_protocol"]

HEADER_TIMEOUT_S = 10.0


class ServeStartError(CrossSiteError):
    """The service cannot start listening: an address that does not resolve, a port in use, no permission."""


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within
    ``header_timeout_s`` (see the module docstring)."""

    header_timeout_s: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._armed_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        # no request head arrived since the timer was armed, and no response is being written
        idle = self.cycle is self._armed_cycle and (self.cycle is None or self.cycle.response_complete)
        if idle and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._armed_cycle:  # a complete request head: its cycle started
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """`HeaderTimeoutProtocol` with its deadline set to ``seconds``."""
    if not seconds > 0:
        raise ServeStartError(f"header timeout must be > 0 s, got {seconds}")
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": float(seconds)})


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host``:``port``, or a one-line `ServeStartError` naming the cause."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ServeStartError(f"--host {host}: cannot resolve this address ({getattr(e, 'strerror', None) or e})"
                              ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "; another program listens there: choose another --port",
                errno.EACCES: "; ports below 1024 need privileges: choose another --port",
                errno.EADDRNOTAVAIL: "; this machine has no such address: check --host"}.get(e.errno, "")
        raise ServeStartError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock
