"""uvicorn's h11 protocol with a deadline on request headers and one on a stalled reader.

uvicorn times out idle keep-alive connections, but not a client that sends its headers a byte at a
time: each such client would hold a socket and a file descriptor for as long as it likes. Here a
connection must finish each request's headers within ``header_timeout_s`` of its start (or of the
previous response), or it is closed. The body has its own deadline (GuardMiddleware).

Nor does uvicorn time out a client that stops reading: a response larger than the socket buffers
(a JSON of many base64 images, pipelined requests, an SSE stream) waits in the transport for a
reader that never comes, and even closing such a connection waits for that buffer to flush. Each
one held its connection slot (``limit_concurrency``) and its unsent bytes for good, so as many
stuck readers as ``KDIFF_MAX_CONNECTIONS`` locked every client out. Here a connection whose writes
stay paused (the transport's buffer above its high-water mark, no byte taken) for
``send_timeout_s`` is aborted, as nginx's ``send_timeout`` does: a slow reader that keeps reading
resets the clock each time the buffer drains.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0  # set by with_header_timeout()
    send_timeout_s: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timers: dict[str, asyncio.TimerHandle] = {}  # "header" / "send": the armed deadlines

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("header", self.header_timeout_s, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm("header")
        self._disarm("send")
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request on this keep-alive connection gets its own deadline
        self._arm("header", self.header_timeout_s, self._on_header_timeout)

    def pause_writing(self) -> None:
        super().pause_writing()
        if "send" not in self._timers:
            self._arm("send", self.send_timeout_s, self._on_send_timeout)

    def resume_writing(self) -> None:
        self._disarm("send")  # the reader took bytes: its clock starts again at the next pause
        super().resume_writing()

    def _arm(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._disarm(name)
        self._timers[name] = self.loop.call_later(delay, callback)

    def _disarm(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _on_send_timeout(self) -> None:
        self._timers.pop("send", None)
        # abort, not close: close() waits for the unsent buffer, which this reader never takes
        self.transport.abort()

    def _on_header_timeout(self) -> None:
        self._timers.pop("header", None)
        waiting_for_headers = self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        )
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(header_timeout_s: float, send_timeout_s: float = 60.0) -> type[DeadlineH11Protocol]:
    """The protocol class to hand uvicorn (``Config(http=...)``) with these deadlines."""
    return type(
        "DeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {"header_timeout_s": header_timeout_s, "send_timeout_s": send_timeout_s},
    )
