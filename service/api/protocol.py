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

And request heads are bounded before h11 parses them: h11's own limit (16 KiB) applies only to a
head still incomplete after a read, and a read takes up to 256 KiB, so a head of 10,000 headers
arriving at once was parsed (32 ms of the event loop each, 30 times a normal request's cost) and
served. Past MAX_HEAD_BYTES or MAX_HEAD_LINES the client gets 431 and the connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# nginx's defaults allow 32 KiB of headers (4 x 8 KiB buffers); browsers send about 20 headers
MAX_HEAD_BYTES = 32 * 1024
MAX_HEAD_LINES = 128
HEAD_END = b"\r\n\r\n"
TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


class DeadlineH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0  # set by with_header_timeout()
    send_timeout_s: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timers: dict[str, asyncio.TimerHandle] = {}  # "header" / "send": the armed deadlines
        self._head = [0, 0]  # bytes and lines of the request head being received
        self._tail = b""  # the last bytes read while waiting for a head (its end may span two reads)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            message = f"request headers over {MAX_HEAD_BYTES} bytes or {MAX_HEAD_LINES} lines".encode()
            self.transport.write(TOO_LARGE % (len(message), message))
            self.transport.close()
            return
        super().data_received(data)

    def _head_too_large(self, data: bytes) -> bool:
        """Count the head bytes in ``data`` (a read while no request head is complete)."""
        window = self._tail + data
        end = window.find(HEAD_END)
        part = data if end < 0 else data[: max(0, end + len(HEAD_END) - len(self._tail))]
        self._head[0] += len(part)
        self._head[1] += part.count(b"\n")
        too_large = self._head[0] > MAX_HEAD_BYTES or self._head[1] > MAX_HEAD_LINES
        if end >= 0:  # the head ends here: the next request counts afresh
            self._head, self._tail = [0, 0], b""
        else:
            self._tail = window[-3:]
        return too_large

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
