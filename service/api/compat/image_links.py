"""Short-lived image URLs for OpenAI's ``response_format: "url"``: PNG bytes kept in memory under
an unguessable token for ``TTL_S`` seconds (bounded in count and bytes, oldest dropped first)."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

TTL_S = 600.0
MAX_IMAGES = 512
MAX_BYTES = 256 * 2**20


class ImageLinks:
    def __init__(
        self, ttl_s: float = TTL_S, max_images: int = MAX_IMAGES, max_bytes: int = MAX_BYTES
    ) -> None:
        self.ttl_s, self.max_images, self.max_bytes = ttl_s, max_images, max_bytes
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def put(self, png: bytes) -> str:
        """Keep ``png``; returns its token."""
        self.purge()
        token = secrets.token_urlsafe(24)
        self._items[token] = (time.monotonic() + self.ttl_s, png)
        self._bytes += len(png)
        while self._items and (len(self._items) > self.max_images or self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))
        return token

    def get(self, token: str) -> bytes | None:
        self.purge()
        item = self._items.get(token)
        return None if item is None else item[1]

    def purge(self) -> None:
        now = time.monotonic()
        for token in [t for t, (expires, _) in self._items.items() if expires <= now]:
            self._drop(token)

    def _drop(self, token: str) -> None:
        _, png = self._items.pop(token)
        self._bytes -= len(png)
