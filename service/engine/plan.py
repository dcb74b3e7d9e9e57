"""The plan of one engine iteration, as a value (vLLM's ``SchedulerOutput``).

The :class:`Scheduler` builds a :class:`Plan` on the event loop from the running jobs and their
drivers; the :class:`Executor` runs it in the worker thread. Because the plan exists before it
runs, it can be logged, checked in tests without a model, and dumped when a model call fails.

A plan holds references to the jobs, drivers and tracks it runs (the executor needs them) but
describes itself with plain data only: job ids, track indices, rows, steps, sampler names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.sampling.driver import Driver, Track

from .jobs import Job


@dataclass(slots=True)
class Slot:
    """One track's pending evaluation inside a model call: ``rows`` consecutive rows of its input.

    Not frozen: one is built per running track per iteration on the event loop, and a frozen
    dataclass's ``__init__`` costs 1.6 us against 0.3 (nothing changes a slot once planned)."""

    job: Job = field(repr=False, compare=False)
    driver: Driver = field(repr=False, compare=False)
    track: Track = field(repr=False, compare=False)
    job_id: str
    track_index: int  # which of the driver's tracks (one per slice of images sharing a stepper)
    rows: int  # the track's images, twice when guided (cond rows, then uncond rows)
    step: int  # the sampler step this evaluation belongs to

    def describe(self) -> dict[str, Any]:
        """Plain data; reads the evaluation's sigma (a device sync: for logs and tests, not the hot path)."""
        pending = self.track.pending
        sigma = None if pending is None else round(float(pending.sigma), 6)
        return {
            "job": self.job_id,
            "track": self.track_index,
            "rows": self.rows,
            "step": self.step,
            "sigma": sigma,
            "sampler": self.driver.spec.sampler,
        }


@dataclass(frozen=True)
class ModelCall:
    """One batched denoiser call: its slots' rows concatenated in order."""

    slots: tuple[Slot, ...]
    row_shape: tuple[int, ...]  # per-row latent shape (what the rows share)
    cond: tuple[str, ...]  # conditioning keys (their per-row shapes match too)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.slots)

    @property
    def job_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.job_id for s in self.slots))

    def describe(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "row_shape": list(self.row_shape),
            "cond": list(self.cond),
            "slots": [s.describe() for s in self.slots],
        }


@dataclass(frozen=True)
class Plan:
    """One iteration: the model calls to run, in order, and every running job's driver (a job with no
    pending evaluation is still in ``drivers``: its driver may be done and need decoding)."""

    iteration: int
    calls: tuple[ModelCall, ...]
    drivers: Mapping[Job, Driver] = field(repr=False, compare=False)
    max_rows: int = 0  # the budget the calls were packed to

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.calls)

    def describe(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "max_rows": self.max_rows,
            "jobs": [job.id for job in self.drivers],
            "calls": [c.describe() for c in self.calls],
        }

    def __str__(self) -> str:
        return json.dumps(self.describe(), separators=(",", ":"))
