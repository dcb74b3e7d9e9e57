"""uvicorn's h11 protocol with a deadline on request headers.

uvicorn times out idle keep-alive connections, but not a client that sends its headers a byte at a
time: each such client would hold a socket and a file descriptor for as long as it likes. Here a
connection must finish each request's headers within ``header_timeout_s`` of its start (or of the
previous response), or it is closed. The body has its own deadline (GuardMiddleware).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0  # set by with_header_timeout()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this keep-alive connection gets its own deadline

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        waiting_for_headers = self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        )
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(header_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class to hand uvicorn (``Config(http=...)``) with this header deadline."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})
