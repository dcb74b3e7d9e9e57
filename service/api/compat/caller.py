"""Who is calling, and what the compatibility routes keep per caller.

A1111 keeps one global state (model, progress, interrupt). Here it is per caller:

- the caller is its API key when keys are set (the key that owns its jobs on our own routes
  too), else the credential it sends (a hash of its Authorization header), else its address;
- ``/sdapi/v1/options`` (the default model, clip skip, ...) is kept per credential, or for the
  whole server when a request brings none;
- ``/sdapi/v1/progress``, ``/interrupt`` and ``/skip`` see the caller's own jobs only: all of them
  for a credential, the most recent one for an address.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request

from service.engine import Job
from service.models.store import LoadedModel
from service.serving.errors import ModelUnavailable
from service.serving.service import Service

from ..deps import accepting, get_state
from ..errors import http_error
from .a1111_options import OptionsStore

MAX_CALLERS = 1024  # callers remembered (least recently seen dropped first)
REQUESTS_PER_CALLER = 64  # recent requests remembered per caller


@dataclass(frozen=True)
class FrontendCaller:
    """Who a frontend request comes from, for the state A1111 keeps per caller (the key of our own
    routes is ``guard.Caller``; this one also knows callers without keys, by credential or address)."""

    key: str  # identifies the caller's jobs
    credential: bool  # True: key comes from a credential; False: from the client address

    @property
    def options_scope(self) -> str:
        return self.key if self.credential else "server"


def caller_of(request: Request) -> FrontendCaller:
    keyed = request.scope.get("state", {}).get("caller")  # set by GuardMiddleware
    if keyed is not None and keyed.key_id is not None:  # keys are on: the key is the caller
        return FrontendCaller("key:" + keyed.key_id, True)
    auth = request.headers.get("authorization", "").strip()
    if auth:
        return FrontendCaller("auth:" + hashlib.sha256(auth.encode()).hexdigest()[:32], True)
    host = request.client.host if request.client else "unknown"
    return FrontendCaller("addr:" + host, False)


@dataclass
class CompatState:
    """Per-caller A1111 options and recent jobs (bounded), kept on ``app.state.compat``."""

    options: OptionsStore = field(default_factory=OptionsStore)
    jobs: OrderedDict[str, deque[list[Job]]] = field(default_factory=OrderedDict)

    def caller_options(self, caller: FrontendCaller) -> dict[str, Any]:
        """A copy of the caller's options (set them with ``options.update``)."""
        return self.options.get(caller.options_scope)

    def track(self, caller: FrontendCaller, jobs: list[Job]) -> None:
        """Remember one request's jobs for the caller."""
        q = self.jobs.setdefault(caller.key, deque(maxlen=REQUESTS_PER_CALLER))
        q.append(list(jobs))
        self.jobs.move_to_end(caller.key)
        while len(self.jobs) > MAX_CALLERS:
            self.jobs.popitem(last=False)

    def active(self, caller: FrontendCaller) -> list[Job]:
        """The caller's unfinished jobs, oldest first (an address: those of its latest request)."""
        return [j for group in self.running_requests(caller) for j in group if not j.status.finished]

    def running_requests(self, caller: FrontendCaller) -> list[list[Job]]:
        """The jobs of each of the caller's requests that still has an unfinished one, finished
        ones included (A1111's progress counts a request's done batches: job_no of job_count)."""
        q = self.jobs.get(caller.key)
        if not q:
            return []
        groups = list(q) if caller.credential else [q[-1]]
        return [group for group in groups if any(not j.status.finished for j in group)]


async def compat_state(request: Request) -> CompatState:
    app_state = request.app.state
    if not hasattr(app_state, "compat"):
        app_state.compat = CompatState()
    return app_state.compat  # type: ignore[no-any-return]


@dataclass
class CompatCall:
    """One frontend request's context: the service, the per-caller compat state and the caller
    (the routes' dependencies :func:`compat_caller` and, for requests that generate, :func:`compat_call`)."""

    request: Request
    state: Service
    compat: CompatState
    caller: FrontendCaller

    @property
    def default_model(self) -> str:
        """The model of a request that names none: the service's default, else the first."""
        return self.state.pool.default_model or self.state.pool.known()[0]

    @contextlib.asynccontextmanager
    async def model(self, name: str) -> AsyncIterator[LoadedModel]:
        """The model a frontend picked (translating its request reads it: family, image size,
        defaults), loaded by the pool if it is not yet and kept from eviction while it is translated;
        a model that cannot be served is its HTTP error."""
        try:
            async with self.state.pool.using(name) as model:
                yield model
        except ModelUnavailable as exc:
            raise http_error(exc) from exc

    def options(self) -> dict[str, Any]:
        """The caller's A1111 options."""
        return self.compat.caller_options(self.caller)

    def active(self) -> list[Job]:
        """The caller's unfinished jobs."""
        return self.compat.active(self.caller)


async def compat_caller(
    request: Request, state: Service = Depends(get_state), compat: CompatState = Depends(compat_state)
) -> CompatCall:
    return CompatCall(request, state, compat, caller_of(request))


async def compat_call(
    call: CompatCall = Depends(compat_caller), _: Service = Depends(accepting)
) -> CompatCall:
    """:func:`compat_caller` for a request that generates: 503 while the service accepts no work."""
    return call
