"""One engine iteration, run in the engine's worker thread: pack, call the model, unpack, advance."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from service.sampling.guidance import cat_cond
from service.sampling.stepper import NonFiniteError

from .jobs import Job, JobError, JobRequest
from .metrics import Metrics
from .runner import ModelRunner
from .work import JobWork, Track

Item = tuple[Job, JobWork, Track]  # the work is captured: the loop may drop job.work meanwhile


@dataclass
class Outcome:
    """What happened to one job in an iteration: progressed, finished (images) or failed (error)."""

    job: Job
    images: Tensor | None = None
    error: JobError | None = None


def _group_key(work: JobWork, track: Track) -> tuple[object, ...]:
    ev = track.pending
    assert ev is not None
    cond = work.cond
    return (tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in cond.items())), tuple(ev.x.shape[1:]))


def _pack(items: list[Item], max_rows: int) -> list[list[Item]]:
    """Split items (oldest job first) into calls of at most max_rows rows; an oversized item goes alone."""
    calls: list[list[Item]] = []
    current: list[Item] = []
    rows = 0
    for job, work, track in items:
        r = work.rows(track)
        if current and rows + r > max_rows:
            calls.append(current)
            current, rows = [], 0
        current.append((job, work, track))
        rows += r
    if current:
        calls.append(current)
    return calls


class _Iteration:
    def __init__(self, runner: ModelRunner, metrics: Metrics | None, model: str) -> None:
        self.runner, self.metrics, self.model = runner, metrics, model
        self.failed: dict[Job, JobError] = {}

    def fail(self, job: Job, code: str, message: str) -> None:
        self.failed.setdefault(job, JobError(code, message))

    def call(self, items: list[Item]) -> None:
        items = [item for item in items if item[0] not in self.failed]
        if not items:
            return
        inputs = [w.inputs(t) for _, w, t in items]
        x = torch.cat([i[0] for i in inputs])
        sigma = torch.cat([i[1] for i in inputs])
        cond = cat_cond([i[2] for i in inputs])
        t0 = time.perf_counter()
        try:
            out = self.runner.denoise(x, sigma, cond)
            if out.shape != x.shape:
                raise RuntimeError(
                    f"the denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
                )
        except Exception as exc:
            jobs = list(dict.fromkeys(item[0] for item in items))
            if len(jobs) > 1:  # retry job by job so only the culprit fails
                for job in jobs:
                    self.call([item for item in items if item[0] is job])
            else:
                self.fail(jobs[0], "model_error", f"the model call failed: {type(exc).__name__}: {exc}")
            return
        if self.metrics is not None:
            self.metrics.observe_call(self.model, x.shape[0], time.perf_counter() - t0)
        offset = 0
        for job, work, track in items:
            rows = work.rows(track)
            part = out[offset : offset + rows]
            offset += rows
            if job in self.failed:
                continue
            try:
                preview = work.feed(track, part)
                if preview is not None:  # a copy: a view would keep the whole batched output alive
                    job.preview = preview[:1].clone()
            except NonFiniteError as exc:
                self.fail(job, "non_finite", str(exc))
            except Exception as exc:
                self.fail(job, "internal", f"the sampler failed: {type(exc).__name__}: {exc}")


def iterate(
    runner: ModelRunner,
    make_work: Callable[[JobRequest], JobWork],
    new: list[Job],
    batch: list[Job],
    max_rows: int,
    metrics: Metrics | None,
    model: str,
) -> list[Outcome]:
    it = _Iteration(runner, metrics, model)
    for job in new:
        try:
            job.work = make_work(job.request)
        except Exception as exc:
            it.fail(job, "invalid_input", f"could not start sampling: {type(exc).__name__}: {exc}")
    works = {job: job.work for job in batch}
    groups: dict[tuple[object, ...], list[Item]] = {}
    for job, work in works.items():
        if job in it.failed or work is None:
            continue
        for track in work.tracks:
            if track.pending is not None:
                groups.setdefault(_group_key(work, track), []).append((job, work, track))
    for items in groups.values():
        for call in _pack(items, max_rows):
            it.call(call)
    outcomes: list[Outcome] = []
    for job, work in works.items():
        if job in it.failed:
            outcomes.append(Outcome(job, error=it.failed[job]))
        elif work is not None and work.done:
            try:
                outcomes.append(Outcome(job, images=runner.decode(work.result())))
            except Exception as exc:
                outcomes.append(Outcome(job, error=JobError("model_error", f"decoding failed: {exc}")))
        else:
            outcomes.append(Outcome(job))
    return outcomes
