"""Short-lived image URLs for OpenAI's ``response_format: "url"``: PNG bytes kept in memory under
an unguessable token for ``TTL_S`` seconds.

Bounded per owner (the API key that made the images; every caller without a key shares one
owner), ``MAX_IMAGES`` links and ``MAX_BYTES`` per owner, oldest dropped first: one key's requests
can expire only its own links, never another key's within their 10 minutes. Keys are a fixed,
configured set, so the whole store stays under (keys + 1) x ``MAX_BYTES``.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

from service.engine.jobs import Job

TTL_S = 600.0
MAX_IMAGES = 512
MAX_BYTES = 256 * 2**20
ANONYMOUS = ""  # the owner of links made without a key


class _Owned:
    """One owner's links, oldest first."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def drop(self, token: str) -> None:
        _, png = self.items.pop(token)
        self.bytes -= len(png)


class ImageLinks:
    def __init__(
        self, ttl_s: float = TTL_S, max_images: int = MAX_IMAGES, max_bytes: int = MAX_BYTES
    ) -> None:
        self.ttl_s, self.max_images, self.max_bytes = ttl_s, max_images, max_bytes
        self._owners: dict[str, _Owned] = {}
        self._owner_of: dict[str, str] = {}  # token -> owner

    def put(self, png: bytes, owner: str | None = None) -> str:
        """Keep ``png`` for ``owner`` (a key id; None: no key); returns its token."""
        self.purge()
        key = owner or ANONYMOUS
        owned = self._owners.setdefault(key, _Owned())
        # on Ray, the engine replica's job-id prefix first: the ingress sends the link's GET to this replica
        token = Job.id_prefix + secrets.token_urlsafe(24)
        owned.items[token] = (time.monotonic() + self.ttl_s, png)
        owned.bytes += len(png)
        self._owner_of[token] = key
        while owned.items and (len(owned.items) > self.max_images or owned.bytes > self.max_bytes):
            self._drop(next(iter(owned.items)))
        return token

    def get(self, token: str) -> bytes | None:
        """The PNG of a live link (any caller: the token is the credential)."""
        self.purge()
        owner = self._owner_of.get(token)
        if owner is None:
            return None
        return self._owners[owner].items[token][1]

    def count(self, owner: str | None = None) -> int:
        owned = self._owners.get(owner or ANONYMOUS)
        return 0 if owned is None else len(owned.items)

    def purge(self) -> None:
        now = time.monotonic()
        for key, owned in list(self._owners.items()):
            while owned.items:  # each owner's links are in expiry order (one TTL)
                token, (expires, _) = next(iter(owned.items.items()))
                if expires > now:
                    break
                self._drop(token)
            if not owned.items:
                del self._owners[key]

    def _drop(self, token: str) -> None:
        owner = self._owner_of.pop(token)
        self._owners[owner].drop(token)
