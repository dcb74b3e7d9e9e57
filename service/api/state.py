"""The service's runtime state: the store's models (loaded at start-up or on first use, unloaded on
request or to fit the memory budget), one engine per loaded model, the job store, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from service.engine import (
    Engine,
    EngineConfig,
    ImageResult,
    Job,
    JobRequest,
    JobStatus,
    JobStore,
    Metrics,
    ModelHandle,
)
from service.engine.jobs import JobError
from service.images import encode_images
from service.models.lora import LoraIndex, attach
from service.models.store import LoadedModel, Manifest, ModelStore, disk_bytes, memory_bytes
from service.models.traced import trace_denoiser
from service.sampling.errors import InputError
from service.sampling.ksampler import sampling_dtype
from service.sampling.spec import SamplingSpec

from .lifecycle import Footprint, ModelBusy, ModelUnavailable, device_bytes
from .previews import Previews, render
from .settings import Settings

log = logging.getLogger("kdiff.service")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def finalize(job: Job, images: Tensor) -> ImageResult:
    """Runs in a thread: PNG-encode a finished job's images with their parameters."""
    params = dict(job.request.parameters)
    seeds = list(params.pop("seeds", job.request.spec.seeds))
    return ImageResult(encode_images(images, params, seeds), seeds, {**params, "seeds": seeds})


class ServiceState:
    """Models (on disk, loading, loaded), one engine per loaded model, the job store, metrics."""

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store or ModelStore(settings.model_store)
        self.metrics = Metrics()
        self.jobs = JobStore(settings.result_ttl_s, settings.max_results, settings.max_result_bytes)
        self.manifests: dict[str, Manifest] = {}  # every model in the store (last scan)
        self.manifest_errors: dict[str, str] = {}
        self.models: dict[str, LoadedModel] = {}  # loaded
        self.engines: dict[str, Engine] = {}
        self.load_errors: dict[str, str] = {}  # the last failed load of each model
        self.footprint = Footprint(0, {}, {})
        self.loras = LoraIndex(self.store.root)
        self._loads: dict[str, asyncio.Task[LoadedModel]] = {}
        self._pins: dict[str, int] = {}  # requests being built against a model: not evictable
        self._waiting: set[asyncio.Task[None]] = set()  # jobs waiting for their model's load
        self._lock = asyncio.Lock()  # one load or unload at a time: the budget stays consistent
        self.ready = False
        self.draining = False
        self.previews = Previews()
        self._threads: int | None = None

    @property
    def default_model(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        if "digits" in self.models or "digits" in self.manifests:
            return "digits"
        return next(iter(self.models), None) or next(iter(sorted(self.manifests)), None)

    def known(self) -> list[str]:
        return sorted({*self.manifests, *self.models})

    def manifest(self, name: str) -> Manifest:
        """The manifest of a known model, loaded or not (loaded ones keep theirs after a rescan)."""
        m = self.models.get(name)
        return m.manifest if m is not None else self.manifests[name]

    def model_state(self, name: str) -> str:
        if name in self.models:
            return "loaded"
        if name in self._loads:
            return "loading"
        return "failed" if name in self.load_errors else "on_disk"

    def refresh(self) -> dict[str, Manifest]:
        """Rescan the store: new folders appear, removed ones go (unless loaded)."""
        errors: dict[str, str] = {}
        self.manifests = self.store.scan(errors)
        self.manifest_errors = errors
        return self.manifests

    async def startup(self) -> None:
        s = self.settings
        if s.torch_threads:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(s.torch_threads)
        self._device, self._dtype = s.resolve_device(), DTYPES[s.dtype]
        budget = s.memory_budget if s.memory_budget is not None else device_bytes(self._device)
        self.footprint.budget = budget
        self.refresh()
        names = s.models or sorted(self.manifests)
        if not names and not self.manifest_errors:  # a wrong path or mount would otherwise serve nothing
            root = self.store.root
            why = "does not exist" if not root.is_dir() else "holds no <name>/manifest.json"
            raise RuntimeError(f"no models to serve: the model store {str(root)!r} {why} (KDIFF_MODEL_STORE)")
        for name in names:
            if name not in self.manifests:
                self.store.resolve(name)  # raises UnknownModelError naming the valid ones
            try:
                await self.ensure_loaded(name)
            except ModelUnavailable as exc:
                if s.models:  # asked for by name: as before, the service does not start without it
                    raise RuntimeError(exc.message) from exc
                log.warning("not preloaded: %s", exc.message)
        if s.default_model and s.default_model not in self.manifests:
            raise ValueError(f"default_model {s.default_model!r} is not in the store; models: {self.known()}")
        self.ready = True

    # --- loading and unloading ---
    async def ensure_loaded(self, name: str) -> LoadedModel:
        """The model, loading it first if needed (off the event loop; concurrent callers share one load).
        Raises ModelUnavailable: unknown, does not fit the budget, or the loader failed."""
        if name in self.models:
            self.footprint.used_at[name] = time.monotonic()
            return self.models[name]
        if name not in self.manifests:
            self.refresh()
        if name not in self.manifests:
            why = self.manifest_errors.get(name)
            raise ModelUnavailable(
                404, "unknown_model", why or f"unknown model {name!r}; models: {self.known()}"
            )
        task = self._loads.get(name)
        if task is None:
            task = self._loads[name] = asyncio.get_running_loop().create_task(self._load(name))
            task.add_done_callback(lambda _t: self._loads.pop(name, None))
        return await asyncio.shield(task)

    async def _load(self, name: str) -> LoadedModel:
        async with self._lock:
            manifest, s = self.manifests[name], self.settings
            for victim in self.footprint.plan_evictions(
                name, await asyncio.to_thread(disk_bytes, manifest), self._idle, self.models
            ):
                await self._unload(victim)
            log.info("loading model %s (%s)", name, manifest.kind)
            try:
                model = await asyncio.to_thread(self.store.load, name, self._device, self._dtype)
                if s.jit:
                    await asyncio.to_thread(trace_denoiser, model.denoiser, _example(model))
            except Exception as exc:
                msg = f"loading model {name!r} failed: {type(exc).__name__}: {exc}"
                self.load_errors[name] = msg
                log.error("%s", msg)
                raise ModelUnavailable(500, "load_failed", msg) from exc
            self.load_errors.pop(name, None)
            self.footprint.weight[name] = memory_bytes(model)
            self.footprint.used_at[name] = time.monotonic()
            adapters = attach(model, self.loras)
            handle = ModelHandle(
                name,
                model.denoiser,
                model.latent_shape,
                model.device,
                model.dtype,
                model.decode,
                None if adapters is None else adapters.call,
            )
            config = EngineConfig(s.max_batch_rows, s.max_queue, s.batch_wait_ms, s.batching)
            engine = Engine(handle, config, self.metrics, finalize)
            engine.start()
            self.models[name], self.engines[name] = model, engine
            log.info("loaded model %s on %s/%s", name, self._device, s.dtype)
            return model

    def _idle(self, name: str) -> bool:
        engine = self.engines.get(name)
        return not self._pins.get(name) and (engine is None or not engine.busy)

    async def unload(self, name: str) -> bool:
        """Unload an idle model (ModelBusy if it has jobs); False if it was not loaded."""
        async with self._lock:
            if name not in self.models:
                return False
            if not self._idle(name):
                raise ModelBusy(name)
            await self._unload(name)
            return True

    async def _unload(self, name: str) -> None:
        engine = self.engines.pop(name)
        model = self.models.pop(name)
        if model.adapters is not None:
            model.adapters.close()
        del model
        self.footprint.weight.pop(name, None)
        await engine.stop()
        del engine
        await asyncio.to_thread(_collect)
        log.info("unloaded model %s", name)

    @contextlib.contextmanager
    def pinned(self, name: str) -> Iterator[None]:
        """While a request is being built against ``name``, it is not evicted."""
        self._pins[name] = self._pins.get(name, 0) + 1
        try:
            yield
        finally:
            self._pins[name] -= 1

    # --- jobs ---
    def submit(
        self, model: str, request: JobRequest, owner: str | None = None, job: Job | None = None
    ) -> Job:
        self.footprint.used_at[model] = time.monotonic()
        job = self.engines[model].submit(request, job)
        job.owner = owner
        self.jobs.add(job)
        return job

    def submit_loading(
        self, model: str, build: Callable[[LoadedModel], JobRequest], owner: str | None = None
    ) -> Job:
        """A job for a model not loaded yet: it waits (events say ``loading``) while the model loads,
        then is built and queued; a failed load fails it with the loader's message."""
        placeholder = JobRequest(
            SamplingSpec("euler", "karras", 1, [0]), 1, {}, timeout_s=self.settings.job_timeout_s
        )
        job = Job(placeholder, model)
        job.loading, job.owner = True, owner
        self.jobs.add(job)
        task = asyncio.get_running_loop().create_task(self._after_load(job, build))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)
        return job

    async def _after_load(self, job: Job, build: Callable[[LoadedModel], JobRequest]) -> None:
        try:
            loaded = await self.ensure_loaded(job.model)
            if job.status.finished:
                return
            with self.pinned(job.model):
                request = await asyncio.to_thread(build, loaded)
                if not job.status.finished:
                    self.submit(job.model, request, job.owner, job)
        except ModelUnavailable as exc:
            job.finish(JobStatus.failed, JobError(exc.code, exc.message))
        except InputError as exc:
            job.finish(JobStatus.failed, JobError("invalid_input", f"{exc.field}: {exc.message}"))
        except Exception as exc:  # queue full, draining, anything else: this job only
            job.finish(JobStatus.failed, JobError("internal", f"{type(exc).__name__}: {exc}"))

    def cancel(self, job: Job) -> None:
        if job.loading:
            job.cancel_requested = True
            job.finish(JobStatus.cancelled)
            return
        engine = self.engines.get(job.model)
        if engine is not None:
            engine.cancel(job)

    def preview(self, job: Job) -> Tensor | None:
        """A running job's latest prediction of its first image (an image, or a latent), or None."""
        engine = self.engines.get(job.model)
        return None if engine is None else engine.preview(job)

    async def preview_png(self, job: Job, max_side: int) -> str | None:
        """A base64 PNG of :meth:`preview` (latent models: decoded by their VAE, see api/previews.py)."""
        latest, model = self.preview(job), self.models.get(job.model)
        if latest is None or model is None:
            return None
        key = (job.id, job.progress.step, max_side)
        png = self.previews.get(key)
        if png is None:
            png = await asyncio.to_thread(render, model, latest[0], max_side)
            self.previews.put(key, png)
        return png

    def queue_position(self, job: Job) -> int | None:
        engine = self.engines.get(job.model)
        return None if engine is None else engine.queue_position(job)

    async def drain(self, timeout_s: float) -> None:
        """Readiness off, refuse new work, let running jobs finish within the timeout, stop engines."""
        self.draining = True
        self.ready = False
        for task in [*self._waiting, *self._loads.values()]:
            task.cancel()
        for job in self.jobs.list():
            if job.loading and not job.status.finished:
                job.finish(
                    JobStatus.failed, JobError("shutdown", "the service shut down while the model loaded")
                )
        await asyncio.gather(*(e.drain(timeout_s) for e in self.engines.values()))

    async def shutdown(self) -> None:
        self.ready = False
        if not self.draining:
            await self.drain(self.settings.drain_timeout_s)
        if self._threads is not None:
            torch.set_num_threads(self._threads)


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _example(model: LoadedModel) -> tuple[Tensor, dict[str, Tensor]]:
    """One row of model input with the conditioning requests bring (to trace the model at startup)."""
    x = torch.zeros(1, *model.latent_shape, device=model.device, dtype=sampling_dtype(model.dtype))
    if model.conditioning != "class":
        return x, {}
    return x, model.class_conditioning(torch.zeros(1, dtype=torch.long, device=model.device))[0]
