"""The ``/ws`` connections: who is listening (key, client id), and sending to them without ever
blocking the sender.

ComfyUI sends every socket the ``status`` message and the running prompt's events to the client id
that queued it (to everyone when the prompt named none). Here a message never crosses keys: a
prompt's events go to its client id under the same key (to all that key's sockets when it named
none), ``status`` to all that key's sockets.

Each socket has a bounded outbox drained by its own task: a slow or stalled client loses preview
frames first, and is disconnected if even its JSON messages pile up, so no prompt waits on a reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket

OUTBOX = 256  # messages waiting per socket before it is dropped as too slow
PREVIEW_ROOM = OUTBOX // 2  # preview frames are skipped once the outbox is this full
PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE
PNG = 2  # ComfyUI's image type code in a preview frame (1 = JPEG)
MAX_SOCKETS = 4096  # open sockets in all (each holds a task and an outbox)
# The largest message a client may send (uvicorn's ws_max_size; its default is 16 MiB): ComfyUI reads
# what clients send only to notice a close, and its clients send nothing or a small `feature_flags`
# JSON. Each message is assembled in memory on the event loop: 20 clients sending 8 MiB messages
# took the server to 1.9 GiB and stalled it for seconds. Past this the socket is closed (1009).
WS_MAX_MESSAGE_BYTES = 64 * 1024
WS_MAX_QUEUE = 4  # messages received and not yet read by the app, per socket


def preview_frame(png: bytes) -> bytes:
    """ComfyUI's binary preview message: big-endian uint32 event type, uint32 image type, image."""
    return struct.pack(">II", PREVIEW_IMAGE, PNG) + png


@dataclass(eq=False)
class Listener:
    socket: WebSocket
    owner: str | None
    client_id: str
    outbox: asyncio.Queue[str | bytes | None] = field(default_factory=lambda: asyncio.Queue(OUTBOX))

    def offer(self, message: str | bytes) -> bool:
        """Queue a message; False when the client is too slow to keep (then it is closed)."""
        if isinstance(message, bytes) and self.outbox.qsize() >= PREVIEW_ROOM:
            return True  # a preview frame the client would see stale anyway
        try:
            self.outbox.put_nowait(message)
            return True
        except asyncio.QueueFull:
            return False

    async def pump(self) -> None:
        """Send the outbox in order until the socket closes (or :meth:`close` queues None)."""
        while (message := await self.outbox.get()) is not None:
            if isinstance(message, bytes):
                await self.socket.send_bytes(message)
            else:
                await self.socket.send_text(message)

    def close(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(None)


class Sockets:
    """Every open ``/ws`` connection, by (key, client id); one connection per pair, as ComfyUI
    keeps one per client id (a reconnect replaces the old one)."""

    def __init__(self) -> None:
        self._by_id: dict[tuple[str | None, str], Listener] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, listener: Listener) -> Listener | None:
        """Register; the listener it replaced (same key and client id), if any."""
        old = self._by_id.pop((listener.owner, listener.client_id), None)
        self._by_id[(listener.owner, listener.client_id)] = listener
        return old

    def remove(self, listener: Listener) -> None:
        if self._by_id.get((listener.owner, listener.client_id)) is listener:
            del self._by_id[(listener.owner, listener.client_id)]

    def listening(self, owner: str | None, client_id: str | None) -> bool:
        """Whether a message to this client (all the key's when None) would reach anyone."""
        return any(True for _ in self._targets(owner, client_id))

    def _targets(self, owner: str | None, client_id: str | None) -> Iterable[Listener]:
        if client_id:
            one = self._by_id.get((owner, client_id))
            return [one] if one is not None else []
        return [li for (o, _), li in list(self._by_id.items()) if o == owner]

    def send(self, owner: str | None, client_id: str | None, kind: str, data: dict[str, Any]) -> None:
        """A JSON message ``{"type": kind, "data": data}`` to the client (all the key's when None)."""
        self._deliver(self._targets(owner, client_id), json.dumps({"type": kind, "data": data}))

    def send_bytes(self, owner: str | None, client_id: str | None, frame: bytes) -> None:
        self._deliver(self._targets(owner, client_id), frame)

    def _deliver(self, targets: Iterable[Listener], message: str | bytes) -> None:
        for listener in targets:
            if not listener.offer(message):
                self.remove(listener)
                listener.close()
                asyncio.get_running_loop().create_task(_close(listener.socket))


async def _close(socket: WebSocket) -> None:
    with contextlib.suppress(Exception):  # already gone: nothing to close
        await socket.close(code=1008, reason="too slow: messages piled up")
