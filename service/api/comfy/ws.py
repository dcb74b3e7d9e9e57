"""``GET /ws?clientId=...`` (and ``/api/ws``): ComfyUI's progress socket.

The key gate only sees HTTP requests, so the socket checks the key itself, from the same headers
(Bearer or Basic): without a valid one, when keys are set, the handshake is refused (HTTP 403)
before it is accepted. On connect the client gets ``status`` (its key's queue size) with its
``sid``; then the events of its key's prompts queued with its client id (``prompts.RunContext``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ..guard import authenticate
from ..settings import settings_of
from .front import ComfyFront
from .sockets import MAX_SOCKETS, Listener

router = APIRouter()


async def comfy_socket(websocket: WebSocket) -> None:
    front: ComfyFront = websocket.app.state.comfy
    settings = settings_of(websocket.app.state.service)
    caller = authenticate(settings, dict(websocket.scope["headers"]))
    if caller is None or len(front.sockets) >= MAX_SOCKETS:
        await websocket.close(code=1008)  # before accept: the handshake is answered 403
        return
    client_id = websocket.query_params.get("clientId", "")[:256] or uuid.uuid4().hex
    await websocket.accept()
    listener = Listener(websocket, caller.key_id, client_id)
    replaced = front.sockets.add(listener)
    if replaced is not None:
        replaced.close()
    sid_status = {"type": "status", "data": {"status": front.status(caller.key_id), "sid": client_id}}
    listener.offer(json.dumps(sid_status))
    pump = asyncio.create_task(listener.pump())
    try:
        # ComfyUI ignores what clients send; reading is how a closed socket is noticed
        while not pump.done():
            receive = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait({receive, pump}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                break
            if receive.result()["type"] == "websocket.disconnect":
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        front.sockets.remove(listener)
        listener.close()
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump


router.add_api_websocket_route("/ws", comfy_socket)
router.add_api_websocket_route("/api/ws", comfy_socket)
