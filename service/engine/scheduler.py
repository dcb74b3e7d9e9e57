"""The scheduler: the engine's batching policy, and nothing else.

``admit`` decides which queued jobs start (oldest first, within the row budget); ``plan`` packs
the pending evaluations of running jobs into model calls and returns them as a :class:`Plan`
value, which the executor runs. Evaluations share a call when their
tensors fit together (same latent shape, same conditioning keys and shapes), whatever the
job's sampler, schedule, step, seeds or guidance scale. The batching modes are strategies:
``iteration`` (the default: join and leave at every model call), and ``request`` and ``serial``,
which exist to measure what iteration-level batching buys.
"""

from __future__ import annotations

import enum
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from torch import Tensor

from service.sampling.driver import Driver

from .jobs import Job
from .plan import ModelCall, Plan, Slot

T = TypeVar("T")
# what rows must share to be concatenated: (conditioning key, per-row shape, dtype)..., latent row shape
_CondKey = tuple[tuple[str, tuple[int, ...], object], ...]
_GroupKey = tuple[_CondKey, tuple[int, ...]]


class Mode(str, enum.Enum):
    iteration = "iteration"  # join and leave at every model call (the default)
    request = "request"  # a batch of jobs runs to completion before the next batch starts
    serial = "serial"  # one job at a time


class Scheduler:
    """Admission and packing for one model's engine."""

    def __init__(
        self, mode: Mode, max_rows: int, cache_hits: Callable[[dict[str, Tensor]], bool] | None = None
    ) -> None:
        self.mode, self.max_rows = mode, max_rows
        # ModelHandle.cache_hits: whether a job's next evaluation reuses its step cache (rows that do
        # go first in their calls: with batch-invariant chunks only chunks whose rows all hold it save)
        self.cache_hits = cache_hits
        # each running driver's conditioning signature, with the dict it was read from (2 us a driver
        # an iteration to read again): a driver's conditioning is set when it is built and replaced
        # whole (a second pass), never edited in place, so it is read again only for another dict.
        # Weak keys: an entry leaves with its driver, holding none of a finished job's tensors
        self._cond_keys: weakref.WeakKeyDictionary[Driver, tuple[dict[str, Tensor], _CondKey]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def holds_results(self) -> bool:
        """Request mode hands results back together, when the whole batch has finished."""
        return self.mode == Mode.request

    def admit(self, queue: deque[Job], running: Sequence[Job], holding: bool) -> list[Job]:
        """Pop the queued jobs that start now (oldest first)."""
        if not queue or (self.mode != Mode.iteration and (running or holding)):
            return []  # nobody waits, or request / serial: nobody joins a running batch
        used = sum(j.request.rows for j in running)
        new: list[Job] = []
        while queue:
            job = queue[0]
            busy = bool(running) or bool(new)
            if busy and (self.mode == Mode.serial or used + job.request.rows > self.max_rows):
                break
            new.append(queue.popleft())
            used += job.request.rows
        return new

    def plan(self, drivers: Mapping[Job, Driver], iteration: int = 0) -> Plan:
        """The model calls for the pending evaluations of the running jobs ``drivers`` (oldest job
        first): grouped by what can be concatenated, then packed up to ``max_rows`` rows; an
        oversized evaluation goes alone. Reads shapes only (no device work): runs on the event loop."""
        groups: dict[_GroupKey, list[Slot]] = {}
        hits: set[Job] = set()
        known = self._cond_keys
        for job, driver in drivers.items():
            cached = known.get(driver)
            if cached is None or cached[0] is not driver.cond:
                cached = known[driver] = (driver.cond, _cond_key(driver.cond))
            for index, track in enumerate(driver.tracks):
                if track.pending is None:
                    continue
                slot = Slot(job, driver, track, job.id, index, driver.rows(track), track.pending.step)
                groups.setdefault((cached[1], tuple(track.pending.x.shape[1:])), []).append(slot)
            if self.cache_hits is not None and self.cache_hits(driver.cond):
                hits.add(job)
        if hits:  # stable: the rows that will reuse their step cache first, in arrival order
            for key, group in groups.items():
                groups[key] = sorted(group, key=lambda slot: slot.job not in hits)
        calls: list[ModelCall] = []
        for (cond, row_shape), group in groups.items():
            for slots in _pack(group, self.max_rows, lambda slot: slot.rows):
                calls.append(ModelCall(tuple(slots), row_shape, tuple(k for k, _, _ in cond)))
        return Plan(iteration, tuple(calls), dict(drivers), self.max_rows)


def _cond_key(cond: Mapping[str, Tensor]) -> _CondKey:
    return tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in cond.items()))


def _pack(items: list[T], max_rows: int, rows_of: Callable[[T], int]) -> list[list[T]]:
    calls: list[list[T]] = []
    current: list[T] = []
    rows = 0
    for item in items:
        r = rows_of(item)
        if current and rows + r > max_rows:
            calls.append(current)
            current, rows = [], 0
        current.append(item)
        rows += r
    if current:
        calls.append(current)
    return calls
