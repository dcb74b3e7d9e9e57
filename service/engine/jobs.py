"""Jobs: what the engine runs, their state, and the bounded store that keeps finished results."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from torch import Tensor

from service.sampling.driver import Driver
from service.sampling.spec import SamplingSpec

from .codes import ErrorCode, JobStatus


class EngineError(Exception):
    """Base of the errors the engine raises at admission."""


class QueueFull(EngineError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(EngineError):
    def __init__(self) -> None:
        super().__init__("the service is shutting down and accepts no new work")


@dataclass
class JobRequest:
    """The engine-level description of one request: n images of one model."""

    spec: SamplingSpec
    n: int
    cond: dict[str, Tensor]  # rows = n
    uncond: dict[str, Tensor] | None = None  # rows = n; None = unguided
    cfg_scale: float = 1.0
    init: Tensor | None = None  # [n, *latent] start for img2img (unnoised)
    mask: Tensor | None = None  # [n or 1, 1 or C, H, W]; 1 = repaint, 0 = keep init
    timeout_s: float = 300.0
    parameters: dict[str, Any] = field(default_factory=dict)  # echoed in results and PNG chunks
    latent_shape: tuple[int, ...] | None = None  # per-image shape when it varies by request (SD sizes)
    driver: Driver | None = None  # built when the request was validated (else by the engine)

    def without_tensors(self) -> JobRequest:
        """The same request minus its tensors: what a finished job keeps (its parameters and spec)."""
        return replace(
            self, cond={}, uncond=None if self.uncond is None else {}, init=None, mask=None, driver=None
        )

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.cfg_scale != 1.0

    @property
    def rows(self) -> int:
        return self.n * (2 if self.guided else 1)


@dataclass(frozen=True)
class ImageResult:
    """A succeeded job's result as it is kept: encoded PNGs (each with its parameters), the seed of
    each image, and the parameters of the request."""

    pngs: list[bytes]
    seeds: list[int]
    parameters: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.pngs)


@dataclass
class Progress:
    step: int = 0  # over all passes
    total: int = 0
    evals: int = 0
    expected_evals: int = 1
    # a job of two passes (hires fix): which one runs, and its own steps (A1111's job_no / sampling_step)
    pass_no: int = 0
    passes: int = 1
    pass_step: int = 0
    pass_steps: int = 0
    # a sampler whose evaluation count is not known ahead (dpm_adaptive): how far it has come in log
    # sigma, the fraction in place of evaluations over expected ones; None for the others
    sigma_fraction: float | None = None
    _followed_pass: int = field(default=-1, repr=False, compare=False)  # the pass follow() last read

    @classmethod
    def of(cls, request: JobRequest) -> Progress:
        d = request.driver
        if d is None:
            return cls(total=request.spec.steps, pass_steps=request.spec.steps)
        return cls(total=d.total_steps, passes=d.passes, pass_steps=d.pass_steps)

    def follow(self, driver: Driver) -> None:
        """The running driver's progress (a finished job: ``finished``)."""
        # every running job, every iteration, on the event loop: each property read once, and what
        # stays the same within a pass (total steps, passes, the pass's steps) only when the pass changes
        step, evals, pass_no = driver.step, driver.evals, driver.pass_no
        if pass_no != self._followed_pass:
            self._followed_pass = self.pass_no = pass_no
            self.total, self.passes, self.pass_steps = driver.total_steps, driver.passes, driver.pass_steps
        self.step, self.evals = min(step, self.total), evals
        self.pass_step = step if self.passes == 1 else driver.pass_step  # one pass: its steps are the job's
        self.expected_evals = max(driver.expected_evals, evals + 1)
        sigma_fraction = driver.sigma_fraction  # None: this pass counts its evaluations
        # a running job is not done whatever its sigma (the views round to 4 places)
        self.sigma_fraction = None if sigma_fraction is None else min(sigma_fraction, _RUNNING_MAX)
        if sigma_fraction:  # the evaluations at this pace in all (A1111's /progress sums them)
            self.expected_evals = max(evals + 1, math.ceil(evals / sigma_fraction))

    def finished(self) -> None:
        self.step, self.evals, self.pass_step = self.total, self.expected_evals, self.pass_steps
        self.sigma_fraction = None

    @property
    def mark(self) -> tuple[int, int]:
        """What moves once per progress event: the step, and for an adaptive sampler (a few long steps)
        each percent of its sigma fraction too."""
        return self.step, -1 if self.sigma_fraction is None else int(self.sigma_fraction * 100)

    @property
    def fraction(self) -> float:
        if self.sigma_fraction is not None:
            return self.sigma_fraction
        return min(1.0, self.evals / max(1, self.expected_evals))


_RUNNING_MAX = 0.9999  # the highest fraction a running job shows


@dataclass(init=False)
class JobError:
    code: ErrorCode
    message: str

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        self.code = ErrorCode(code)  # a string naming a code is converted; an unknown one raises
        self.message = message


class Job:
    """One request's life: queued -> running -> succeeded | failed | cancelled."""

    # Hex prefix of every id this process hands out (still 32 hex characters in all): a Ray Serve engine
    # replica puts its slot and incarnation here so that any ingress replica can route /jobs/{id} back
    # to it (service/deploy/ray_serve.py). Empty in a single-process server.
    id_prefix: ClassVar[str] = ""

    def __init__(self, request: JobRequest, model: str) -> None:
        self.id = (Job.id_prefix + uuid.uuid4().hex)[:32]
        self.request = request
        self.model = model
        self.status = JobStatus.queued
        self.progress = Progress.of(request)
        self.error: JobError | None = None
        self.result: Any = None
        self.created = time.time()
        self.t_created = time.monotonic()
        self.t_started: float | None = None
        self.t_computed: float | None = None
        self.t_finished: float | None = None
        self.deadline = self.t_created + request.timeout_s
        self.cancel_requested = False
        # a cancel of the running job keeps the images as they stand (A1111's /interrupt): it ends
        # cancelled with those as its result (each unfinished image's latest denoised prediction)
        self.keep_partial = False
        self.owner: str | None = None  # the API key (its id) that created the job; None = no keys
        self.loading = False  # queued behind its model's load (the request is a placeholder until then)
        # steps at which the engine keeps the first image's prediction (OpenAI's streamed partial
        # images); what it kept waits in ``snapshots`` (step, prediction) until the stream takes it
        self.snapshot_steps: frozenset[int] = frozenset()
        self.snapshots: list[tuple[int, Tensor]] = []
        self._changed = asyncio.Event()
        self._watched = False  # whether anyone took _changed (change_event) since it was last set
        self._done = asyncio.Event()

    def attach(self, request: JobRequest) -> Job:
        """The real request of a job that waited for its model to load (its deadline stays)."""
        self.request, self.loading = request, False
        self.progress = Progress.of(request)
        return self

    # --- notifications (event-loop side only) ---
    def change_event(self) -> asyncio.Event:
        """The event set at the next change; take it *before* reading the state."""
        self._watched = True
        return self._changed

    def notify(self) -> None:
        # every running job is notified every iteration; most have nobody watching (a /sample caller
        # waits for the end only), and an event nobody took since the last change needs no replacing
        if self._watched:
            old, self._changed, self._watched = self._changed, asyncio.Event(), False
            old.set()
        if self.status.finished:
            self._done.set()

    def snapshot(self, step: int, latest: Tensor | None) -> None:
        """Keep ``latest``'s first image at an asked step, once (a sampler of two model calls per
        step reports a step twice: the first prediction seen is kept)."""
        if latest is None or step not in self.snapshot_steps or any(s == step for s, _ in self.snapshots):
            return
        self.snapshots.append((step, latest[:1].clone()))  # a copy: a view would pin the whole batch

    async def wait_done(self) -> None:
        await self._done.wait()

    def finish(self, status: JobStatus, error: JobError | None = None, result: Any = None) -> None:
        if self.status.finished:
            return
        self.status, self.error, self.result = status, error, result
        self.t_finished = time.monotonic()
        # A kept result holds encoded bytes only: tensors (conditioning, init image, the sampler
        # state) would pin native or device memory for as long as the result is kept.
        self.request = self.request.without_tensors()
        self.notify()

    @property
    def result_bytes(self) -> int:
        """What the kept result weighs: its encoded images."""
        return self.result.nbytes if isinstance(self.result, ImageResult) else 0

    def timings(self) -> dict[str, float | None]:
        def span(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(b - a, 6)

        return {
            "queue_s": span(self.t_created, self.t_started),
            "run_s": span(self.t_started, self.t_computed),
            "encode_s": span(self.t_computed, self.t_finished),
            "total_s": span(self.t_created, self.t_finished),
        }

    def eta_s(self) -> float | None:
        frac = self.progress.fraction
        if self.t_started is None or self.progress.evals == 0 or frac <= 0:  # no pace to go by yet
            return None
        elapsed = time.monotonic() - self.t_started
        return round(elapsed * (1 - frac) / max(frac, 1e-9), 3)


class JobStore:
    """Jobs by id. Finished ones are dropped after ``ttl_s``, beyond ``max_finished`` and beyond
    ``max_bytes`` of kept results (oldest first)."""

    def __init__(self, ttl_s: float, max_finished: int, max_bytes: int | None = None) -> None:
        self.ttl_s, self.max_finished, self.max_bytes = ttl_s, max_finished, max_bytes
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        # told of every job dropped (discarded, expired, over the bounds): a durable store forgets it too
        self.on_drop: Callable[[Job], None] | None = None

    def add(self, job: Job) -> None:
        self.purge()
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        self.purge()
        return self._jobs.get(job_id)

    def discard(self, job: Job) -> None:
        if self._jobs.pop(job.id, None) is not None and self.on_drop is not None:
            self.on_drop(job)

    def list(self) -> list[Job]:
        self.purge()
        return list(self._jobs.values())

    @property
    def result_bytes(self) -> int:
        return sum(j.result_bytes for j in self._jobs.values())

    def purge(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        finished = [j for j in self._jobs.values() if j.status.finished]
        finished.sort(key=lambda j: j.t_finished or 0.0)
        excess = len(finished) - self.max_finished
        budget = self.max_bytes
        total = sum(j.result_bytes for j in finished) if budget is not None else 0
        for i, job in enumerate(finished):
            expired = job.t_finished is not None and now - job.t_finished > self.ttl_s
            over_bytes = budget is not None and total > budget
            if i < excess or expired or over_bytes:
                total -= job.result_bytes
                del self._jobs[job.id]
                if self.on_drop is not None:
                    self.on_drop(job)

    def __len__(self) -> int:
        return len(self._jobs)
