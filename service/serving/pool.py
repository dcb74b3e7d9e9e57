"""The model pool: every model of the store (its manifest and typed defaults), loaded on first use
(one shared load per model, the loader in a thread), unloaded on request or evicted least recently
used first to fit the memory budget, pinned while a request is built against it; one engine per
loaded model. Failures are :class:`ModelUnavailable` with an :class:`ErrorCode`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from service.engine import Engine, EngineConfig, ImageResult, Job, Metrics, ModelHandle
from service.engine.scheduler import Mode
from service.models import lora, stepcache
from service.models.compiled import compile_denoiser, default_buckets
from service.models.embeddings import EmbeddingIndex, attach_embeddings
from service.models.lora import LoraIndex, attach
from service.models.store import LoadedModel, Manifest, ModelDefaults, ModelStore, disk_bytes, memory_bytes
from service.models.text_image import TextLoadedModel
from service.models.traced import trace_denoiser
from service.models.upscalers import UpscalerConfig, Upscalers, UpscalerSettings

from .errors import ErrorCode, ModelBusy, ModelUnavailable, StartupError

log = logging.getLogger("kdiff.service")
SHIPPED = "digits"  # the model the repository ships: the default when the settings name none
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def row_bound(cond: dict[str, Tensor]) -> bool:
    """ModelHandle.row_bound: a call with a live per-row LoRA or step cache keeps its planned shape."""
    return lora.live(cond.get(lora.KEY)) or stepcache.live(cond.get(stepcache.KEY))


class PoolSettings(UpscalerSettings, Protocol):
    """What the pool reads from the service's settings (``service.api.settings.Settings`` has it)."""

    models: list[str]
    default_model: str | None
    dtype: Literal["auto", "float32", "float16", "bfloat16"]
    memory_budget: int | None
    torch_threads: int | None
    jit: bool
    compile: bool
    compile_buckets: list[int]
    max_batch_rows: int
    max_queue: int
    batch_wait_ms: float
    batching: Mode
    invariant_rows: int

    def resolve_device(self) -> str: ...
    def resolve_dtype(self, device: str) -> str: ...


def device_bytes(device: str) -> int:
    """What the device has: a GPU's total memory, or the machine's RAM for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


@dataclass
class Footprint:
    """Models' memory: the bytes each loaded one holds, and when each was last used."""

    budget: int
    used_at: dict[str, float]
    weight: dict[str, int]

    def plan_evictions(
        self, name: str, need: int, idle: Callable[[str], bool], loaded: Iterable[str], what: str = ""
    ) -> list[str]:
        """The idle models to unload (least recently used first) so that ``need`` more bytes fit;
        raises ModelUnavailable (never fits; or, transient, the room is held by busy models).
        ``what``: what ``need`` is for, when it is more than the model itself (its ControlNets)."""
        if need > self.budget:
            raise ModelUnavailable(
                ErrorCode.insufficient_memory,
                f"model {name!r}{what} needs about {fmt_bytes(need)}, more than the memory budget of "
                f"{fmt_bytes(self.budget)} (KDIFF_MEMORY_BUDGET)",
            )
        others = [m for m in loaded if m != name]
        used = sum(self.weight.get(m, 0) for m in others)
        out: list[str] = []
        for m in sorted((m for m in others if idle(m)), key=lambda m: self.used_at.get(m, 0.0)):
            if used + need <= self.budget:
                break
            out.append(m)
            used -= self.weight.get(m, 0)
        if used + need > self.budget:
            raise ModelUnavailable(
                ErrorCode.insufficient_memory,
                f"model {name!r}{what} needs about {fmt_bytes(need)}; the memory budget of "
                f"{fmt_bytes(self.budget)} (KDIFF_MEMORY_BUDGET) is held by models with "
                "running jobs; retry later",
                transient=True,
            )
        return out


Finalize = Callable[[Job, Tensor], ImageResult]


class ModelPool:
    """Models (on disk, loading, loaded), their defaults, and one engine per loaded model."""

    def __init__(
        self, settings: PoolSettings, store: ModelStore, metrics: Metrics, finalize: Finalize
    ) -> None:
        self.settings, self.store, self.metrics, self._finalize = settings, store, metrics, finalize
        self.manifests: dict[str, Manifest] = {}  # every model in the store (last scan)
        self.manifest_errors: dict[str, str] = {}
        self.models: dict[str, LoadedModel] = {}  # loaded
        self.engines: dict[str, Engine] = {}
        self.load_errors: dict[str, str] = {}  # the last failed load of each model
        self.footprint = Footprint(0, {}, {})
        self.loras = LoraIndex(self.store.root)
        self.embeddings = EmbeddingIndex(self.store.root)
        self.upscalers = Upscalers(self.store.root / "upscalers")  # model_store/upscalers/*.pth|safetensors
        self.loads: dict[str, asyncio.Task[LoadedModel]] = {}
        self._pins: dict[str, int] = {}  # requests being built against a model: not evictable
        self._lock = asyncio.Lock()  # one load or unload at a time: the budget stays consistent
        self._device, self._dtype = "cpu", torch.float32

    @property
    def device(self) -> str:
        """The device models load on (settled at start())."""
        return self._device

    # --- what the store has ---
    @property
    def default_model(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        if SHIPPED in self.models or SHIPPED in self.manifests:
            return SHIPPED
        return next(iter(self.models), None) or next(iter(sorted(self.manifests)), None)

    def known(self) -> list[str]:
        return sorted({*self.manifests, *self.models})

    def manifest(self, name: str) -> Manifest:
        """The manifest of a known model, loaded or not (loaded ones keep theirs after a rescan)."""
        m = self.models.get(name)
        return m.manifest if m is not None else self.manifests[name]

    def defaults(self, name: str) -> ModelDefaults:
        return self.manifest(name).model_defaults

    def model_state(self, name: str) -> str:
        if name in self.models:
            return "loaded"
        if name in self.loads:
            return "loading"
        return "failed" if name in self.load_errors else "on_disk"

    def refresh(self) -> dict[str, Manifest]:
        """Rescan the store: new folders appear, removed ones go (unless loaded). What it skips (a
        broken manifest, a folder without one, ...) is in ``manifest_errors`` and logged once."""
        errors: dict[str, str] = {}
        self.manifests = self.store.scan(errors)
        for name, why in errors.items():
            if self.manifest_errors.get(name) != why:
                log.warning("model store: skipped %r: %s", name, why)
        self.manifest_errors = errors
        return self.manifests

    def resolve(self, name: str | None) -> str | None:
        """``name`` (else the default model) if the store has it after a rescan when needed, else None."""
        name = name or self.default_model
        if name is None or name in self.models or name in self.manifests or name in self.refresh():
            return name
        return None

    async def start(self) -> None:
        """Scan the store and load what the settings name (or every model, best effort). Raises
        StartupError (one line for the operator) when there is nothing to serve, when a model the
        settings name is not there or fails to load, or when the default model fails to load."""
        s = self.settings
        self._device = s.resolve_device()
        self._dtype = DTYPES[s.resolve_dtype(self._device)]
        self.footprint.budget = s.memory_budget if s.memory_budget is not None else device_bytes(self._device)
        self.upscalers.configure(UpscalerConfig.of(s, self._device, self._dtype))
        self.refresh()
        if not self.manifests:  # a wrong path or mount would otherwise serve nothing
            root = self.store.root
            why = "does not exist" if not root.is_dir() else "holds no <name>/manifest.json"
            if self.manifest_errors:
                why = "has no usable model: " + "; ".join(self.manifest_errors.values())
            raise StartupError(f"no models to serve: the model store {str(root)!r} {why} (KDIFF_MODEL_STORE)")
        named = [*((m, "KDIFF_MODELS") for m in s.models), (s.default_model, "KDIFF_DEFAULT_MODEL")]
        for name, setting in named:
            if name and name not in self.manifests:  # before any load: fail fast
                why = self.manifest_errors.get(name) or f"not in the store; models: {', '.join(self.known())}"
                raise StartupError(f"model {name!r} ({setting}): {why}")
        never: dict[str, str] = {}  # models that failed to load or can never fit the memory budget
        for name in s.models or sorted(self.manifests):
            try:
                await self.ensure_loaded(name)
            except ModelUnavailable as exc:
                if s.models:  # asked for by name: the service does not start without it
                    raise StartupError(f"{exc.message} (KDIFF_MODELS)") from exc
                if exc.code == ErrorCode.load_failed or not exc.transient:
                    never[name] = exc.message
                log.warning("not preloaded: %s", exc.message)
        default = self.default_model  # (a failed one only when it is named, the shipped one, or all failed)
        if default in never:  # requests that name no model would all fail: do not start
            others = ", ".join(m for m in self.models if m != default) or "none"
            raise StartupError(
                f"the default model: {never[default]}; fix it, or set KDIFF_DEFAULT_MODEL to another model "
                f"(loaded: {others})"
            )

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
                ErrorCode.unknown_model, why or f"unknown model {name!r}; models: {self.known()}"
            )
        task = self.loads.get(name)
        if task is None:
            task = self.loads[name] = asyncio.get_running_loop().create_task(self._load(name))
            task.add_done_callback(lambda _t: self.loads.pop(name, None))
        return await asyncio.shield(task)

    async def _load(self, name: str) -> LoadedModel:
        async with self._lock:
            manifest, s = self.manifests[name], self.settings
            for victim in self.footprint.plan_evictions(
                name, await asyncio.to_thread(disk_bytes, manifest), self.idle, self.models
            ):
                await self._unload(victim)
            log.info("loading model %s (%s)", name, manifest.kind)
            try:
                model = await asyncio.to_thread(self.store.load, name, self._device, self._dtype)
                if s.compile:  # supersedes the trace: one compiled graph per (inputs, bucket)
                    await asyncio.to_thread(self._compile, model)
                elif s.jit and not isinstance(model, TextLoadedModel):  # traces the project's UNet only
                    await asyncio.to_thread(trace_denoiser, model.denoiser, model.example_input())
            except Exception as exc:
                msg = f"loading model {name!r} failed: {type(exc).__name__}: {exc} (folder {manifest.folder})"
                self.load_errors[name] = msg
                log.error("%s", msg)
                raise ModelUnavailable(ErrorCode.load_failed, msg) from exc
            self.load_errors.pop(name, None)
            self.footprint.weight[name] = memory_bytes(model)
            self.footprint.used_at[name] = time.monotonic()
            adapters = attach(model, self.loras)
            attach_embeddings(model, self.embeddings)
            handle = ModelHandle(
                name,
                model.denoiser,
                model.latent_shape,
                model.device,
                model.dtype,
                model.decode,
                None if adapters is None else adapters.call,
                stepcache.release,
                stepcache.predicted_hit,  # rows that will reuse their step cache share calls
                row_bound,  # calls that must keep their planned shape (batch-invariant wide calls)
            )
            # fixed-shape calls (batch-invariant mode): a cached row's neighbours keep their shapes
            stepcache.STORE.fixed_shape = bool(s.invariant_rows)
            config = EngineConfig(
                s.max_batch_rows, s.max_queue, s.batch_wait_ms, s.batching, s.invariant_rows or None
            )
            engine = Engine(handle, config, self.metrics, self._finalize)
            engine.start()
            self.models[name], self.engines[name] = model, engine
            model.memory_hook = self._memory_hook(name)
            # the new model's objects are long-lived: freeze them (what was frozen before stays)
            await asyncio.to_thread(settle_heap, False)
            log.info("loaded model %s on %s/%s", name, self._device, str(self._dtype).removeprefix("torch."))
            return model

    def _memory_hook(self, name: str) -> Callable[[int], None]:
        """What a loaded model calls, from a build thread, before it loads more weights (a
        ControlNet, an IP-Adapter): the bytes join its footprint, idle models are evicted least recently used
        first to make room, or ModelUnavailable (507) refuses, as for loading a model."""
        loop = asyncio.get_running_loop()

        def reserve(nbytes: int) -> None:
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if on_loop:  # no thread to block for an eviction: only what fits now
                self._plan_growth(name, nbytes, lambda _m: False)
                self.footprint.weight[name] = self.footprint.weight.get(name, 0) + nbytes
            else:
                asyncio.run_coroutine_threadsafe(self._grow(name, nbytes), loop).result()

        return reserve

    async def _grow(self, name: str, nbytes: int) -> None:
        async with self._lock:
            for victim in self._plan_growth(name, nbytes, self.idle):
                await self._unload(victim)
            self.footprint.weight[name] = self.footprint.weight.get(name, 0) + nbytes

    def _plan_growth(self, name: str, nbytes: int, idle: Callable[[str], bool]) -> list[str]:
        """The models to evict so that ``name`` fits with ``nbytes`` more (none when it shrinks)."""
        if nbytes <= 0:
            return []
        need = self.footprint.weight.get(name, 0) + nbytes
        return self.footprint.plan_evictions(
            name, need, idle, self.models, " with its ControlNets / IP-Adapters"
        )

    def _compile(self, model: LoadedModel) -> None:
        """Serve the network through torch.compile, every bucket compiled now for the example input."""
        buckets = self.settings.compile_buckets or default_buckets(self.settings.max_batch_rows)
        with torch.inference_mode():
            example = model.example_input()
        if compile_denoiser(model.denoiser, buckets, example, label=f"model {model.name}") is None:
            log.warning("model %s: no network to compile, serving eager", model.name)

    def idle(self, name: str) -> bool:
        engine = self.engines.get(name)
        return not self._pins.get(name) and (engine is None or not engine.busy)

    async def unload(self, name: str) -> bool:
        """Unload an idle model (ModelBusy if it has jobs); False if it was not loaded."""
        async with self._lock:
            if name not in self.models:
                return False
            if not self.idle(name):
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
        await asyncio.to_thread(settle_heap)
        log.info("unloaded model %s", name)

    @contextlib.asynccontextmanager
    async def using(self, name: str) -> AsyncIterator[LoadedModel]:
        """The model, loaded first if needed, kept from eviction while a request is built against it.

        Pinned before the load is awaited: pinned after, an unload could take the model in between
        (the load done, this caller not yet resumed) and the request would reach a missing engine."""
        with self.pinned(name):
            model = await self.ensure_loaded(name)
            while self.models.get(name) is not model:  # unloaded before the pin (a load in flight)
                model = await self.ensure_loaded(name)
            yield model

    @contextlib.contextmanager
    def pinned(self, name: str) -> Iterator[None]:
        """While a request is being built against ``name``, it is not evicted."""
        self._pins[name] = self._pins.get(name, 0) + 1
        try:
            yield
        finally:
            self._pins[name] -= 1

    def touch(self, name: str) -> None:
        self.footprint.used_at[name] = time.monotonic()

    def cancel_loads(self) -> None:
        for task in list(self.loads.values()):
            task.cancel()


def settle_heap(unfreeze: bool = True) -> None:
    """Collect garbage, then freeze what survives (``gc.freeze``): the long-lived objects of loaded
    models and imports leave the collector's generations, so the full collections that running jobs
    trigger no longer scan them (with 128 running jobs they took ~28 ms each, half the engine's time:
    bench/bench_engine_overhead.py). Unfrozen first, so an unloaded model's cycles are freed.

    After a load (``unfreeze=False``) only what came since the last settle is collected and frozen:
    nothing frozen became the new model's garbage, and rescanning every frozen object costs a full
    pass over the heap (~0.5 s per load in a test process that imported the whole suite). Frozen
    garbage waits for the next unload's settle."""
    if unfreeze:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
