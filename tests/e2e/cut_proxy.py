"""A loopback TCP proxy whose open connections the test can cut mid-response (a reset, as a Wi-Fi
drop, a proxy's idle timeout or a load balancer's restart does to a browser's event stream).

Chromium's offline emulation does not end a response already streaming, and Playwright's routes
answer whole bodies only, so a real drop in the middle of a Server-Sent Events stream needs a hop
the test controls.
"""

from __future__ import annotations

import socket
import struct
import threading

from tests.support.server import free_port


class CutProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; ``cut()`` resets every open connection."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by close()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket, reset: bool = False) -> None:
        for s in socks:
            with self._lock:
                self._live.discard(s)
            try:
                if reset:  # linger 0: close() sends a reset, not a clean end
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # wakes the pump blocked in recv() (SHUT_RD sends nothing; SHUT_RDWR sends a FIN)
                s.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self) -> int:
        """Reset every open connection; returns how many there were."""
        with self._lock:
            live = list(self._live)
        self._drop(*live, reset=True)
        return len(live)

    def close(self) -> None:
        """Stop listening (new connections are refused) and reset the open ones."""
        try:  # wakes the accept() blocked in the thread: close() alone leaves it listening until then
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self.cut()
