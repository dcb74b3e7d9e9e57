"""The service's runtime state: loaded models, one engine per model, the job store, metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from torch import Tensor

from service.engine import Engine, EngineConfig, Job, JobRequest, JobStore, Metrics, ModelHandle
from service.images import encode_images
from service.models.store import LoadedModel, ModelStore
from service.models.traced import trace_denoiser
from service.sampling.ksampler import sampling_dtype

from .settings import Settings

log = logging.getLogger("kdiff.service")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def finalize(job: Job, images: Tensor) -> dict[str, Any]:
    """Runs in a thread: PNG-encode a finished job's images with their parameters."""
    params = dict(job.request.parameters)
    seeds = list(params.pop("seeds", job.request.spec.seeds))
    return {
        "pngs": encode_images(images, params, seeds),
        "seeds": seeds,
        "parameters": {**params, "seeds": seeds},
    }


class ServiceState:
    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store or ModelStore(settings.model_store)
        self.metrics = Metrics()
        self.jobs = JobStore(settings.result_ttl_s, settings.max_results, settings.max_result_bytes)
        self.models: dict[str, LoadedModel] = {}
        self.engines: dict[str, Engine] = {}
        self.ready = False
        self.draining = False
        self._threads: int | None = None

    @property
    def default_model(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        if "digits" in self.models:
            return "digits"
        return next(iter(self.models), None)

    async def startup(self) -> None:
        s = self.settings
        if s.torch_threads:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(s.torch_threads)
        device, dtype = s.resolve_device(), DTYPES[s.dtype]
        names = s.models or sorted(self.store.scan())
        if not names:  # a wrong path or mount would otherwise serve nothing and still report ready
            root = self.store.root
            why = "does not exist" if not root.is_dir() else "holds no <name>/manifest.json"
            raise RuntimeError(f"no models to serve: the model store {str(root)!r} {why} (KDIFF_MODEL_STORE)")
        for name in names:
            model = await asyncio.to_thread(self.store.load, name, device, dtype)
            if s.jit:
                await asyncio.to_thread(trace_denoiser, model.denoiser, _example(model))
            self.models[name] = model
            handle = ModelHandle(
                name, model.denoiser, model.latent_shape, model.device, model.dtype, model.decode
            )
            config = EngineConfig(s.max_batch_rows, s.max_queue, s.batch_wait_ms, s.batching)
            engine = Engine(handle, config, self.metrics, finalize)
            engine.start()
            self.engines[name] = engine
            log.info("loaded model %s (%s) on %s/%s", name, model.manifest.kind, device, s.dtype)
        if s.default_model and s.default_model not in self.models:
            raise ValueError(
                f"default_model {s.default_model!r} is not loaded; loaded: {sorted(self.models)}"
            )
        self.ready = True

    def submit(self, model: str, request: JobRequest, owner: str | None = None) -> Job:
        job = self.engines[model].submit(request)
        job.owner = owner
        self.jobs.add(job)
        return job

    def cancel(self, job: Job) -> None:
        engine = self.engines.get(job.model)
        if engine is not None:
            engine.cancel(job)

    def preview(self, job: Job) -> Tensor | None:
        """A running job's latest prediction of its first image (pixel models), for progress events."""
        engine = self.engines.get(job.model)
        return None if engine is None else engine.preview(job)

    def queue_position(self, job: Job) -> int | None:
        engine = self.engines.get(job.model)
        return None if engine is None else engine.queue_position(job)

    async def drain(self, timeout_s: float) -> None:
        """Readiness off, refuse new work, let running jobs finish within the timeout, stop engines."""
        self.draining = True
        self.ready = False
        await asyncio.gather(*(e.drain(timeout_s) for e in self.engines.values()))

    async def shutdown(self) -> None:
        self.ready = False
        if not self.draining:
            await self.drain(self.settings.drain_timeout_s)
        if self._threads is not None:
            torch.set_num_threads(self._threads)


def _example(model: LoadedModel) -> tuple[Tensor, dict[str, Tensor]]:
    """One row of model input with the conditioning requests bring (to trace the model at startup)."""
    x = torch.zeros(1, *model.latent_shape, device=model.device, dtype=sampling_dtype(model.dtype))
    if model.conditioning != "class":
        return x, {}
    return x, model.class_conditioning(torch.zeros(1, dtype=torch.long, device=model.device))[0]
