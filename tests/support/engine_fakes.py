"""A fake deterministic, row-independent denoiser and helpers for engine tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from service.engine import Engine, EngineConfig, Job, JobRequest, Metrics, Mode, ModelHandle
from service.sampling.ksampler import KSampler, SamplingSpec

T = TypeVar("T")
NUM_CLASSES = 10
FAIL_LABEL = 8  # rows with this class raise in the model call
NAN_LABEL = 9  # rows with this class come back NaN
SHAPE = (1, 4, 4)


class FakeDenoiser:
    """Elementwise, so each row's output depends on that row only; records rows per call."""

    sigma_min = 0.02
    sigma_max = 20.0
    num_classes = NUM_CLASSES

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.labels: list[list[int]] = []

    def __call__(self, x: Tensor, sigma: Tensor, class_cond: Tensor | None = None) -> Tensor:
        labels = torch.full([x.shape[0]], NUM_CLASSES) if class_cond is None else class_cond
        self.calls.append(x.shape[0])
        self.labels.append(labels.tolist())
        if self.delay_s:
            time.sleep(self.delay_s)
        if (labels == FAIL_LABEL).any():
            raise RuntimeError("simulated CUDA error")
        s = sigma.view(-1, 1, 1, 1)
        shift = (labels.to(x.dtype) - 4.5).view(-1, 1, 1, 1) * 0.05
        out = x / (1 + s**2) + 0.1 * torch.tanh(x) * s / (1 + s) + shift * s / (1 + s)
        nan_rows = (labels == NAN_LABEL).view(-1, 1, 1, 1)
        return torch.where(nan_rows, torch.full_like(out, float("nan")), out)


def handle(model: FakeDenoiser, name: str = "fake") -> ModelHandle:
    return ModelHandle(name, model, SHAPE, torch.device("cpu"), torch.float32)


def request(
    sampler: str = "euler",
    steps: int = 10,
    seeds: list[int] | None = None,
    label: int | None = 3,
    cfg: float = 1.0,
    timeout_s: float = 60.0,
    schedule: str = "karras",
) -> JobRequest:
    seeds = [0] if seeds is None else seeds
    n = len(seeds)
    cond = {} if label is None else {"class_cond": torch.full([n], label)}
    uncond = {"class_cond": torch.full([n], NUM_CLASSES)} if cfg != 1.0 else None
    spec = SamplingSpec(sampler, schedule, steps, seeds)
    return JobRequest(spec, n, cond, uncond, cfg, timeout_s=timeout_s)


def reference(model: FakeDenoiser, req: JobRequest) -> Tensor:
    """The same request run directly through KSampler (one stepper loop, no engine)."""
    spec = req.spec
    ks = KSampler(model, spec.sampler, spec.schedule)
    cond = req.cond.get("class_cond")
    return ks.sample(
        shape=(req.n, *SHAPE), steps=spec.steps, seed=spec.seeds, condition=cond, cfg_scale=req.cfg_scale
    )


def make_engine(model: FakeDenoiser, mode: Mode = Mode.iteration, **cfg: Any) -> Engine:
    cfg.setdefault("batch_wait_ms", 0.0)
    return Engine(handle(model), EngineConfig(mode=mode, **cfg), metrics=Metrics())


def run(fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), timeout)

    return asyncio.run(main())


def run_jobs(model: FakeDenoiser, *reqs: JobRequest, **cfg: Any) -> list[Job]:
    """Submit ``reqs`` together to a fresh engine over ``model``, wait for all of them, stop it."""

    async def go() -> list[Job]:
        engine = make_engine(model, **cfg)
        engine.start()
        jobs = [engine.submit(r) for r in reqs]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    return run(go)
