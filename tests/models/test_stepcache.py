"""Step caching on the shipped digits UNet (DeepCache), decided per row inside shared model calls.

The must-haves of issue 28 section 3: a cached request mixed with others gives what it gives alone
(within 1e-5); an uncached request mixed with cached ones is bit for bit its solo run (the engine's
batch-invariant mode); the cache is per job and gone when the job ends; and the cache really skips
work (it changes the image, and the skipped part ran on fewer rows).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.engine import Engine, EngineConfig, JobRequest, JobStatus, ModelHandle
from service.models import stepcache
from service.models.lora import LoraIndex, attach
from service.models.stepcache import KEY, STORE, CacheSpec, cache_rows
from service.models.store import LoadedModel, ModelStore
from service.models.traced import TracedModule
from service.sampling.errors import InputError
from service.sampling.spec import SamplingSpec
from tests.support.engine_fakes import run

MODEL_STORE = Path(__file__).resolve().parents[2] / "model_store"
CHUNK = 8  # the service's default KDIFF_INVARIANT_ROWS
PLAIN = {"label": 5, "sampler": "euler_ancestral", "steps": 8, "seed": 5095, "n": 2, "cfg": 3.0}
EVERY3 = {
    "label": 1,
    "sampler": "dpmpp_2m",
    "steps": 9,
    "seed": 1,
    "n": 1,
    "cfg": 3.0,
    "cache": CacheSpec("deepcache", interval=3),
}
BY_CHANGE = {
    "label": 7,
    "sampler": "euler",
    "steps": 10,
    "seed": 7,
    "n": 2,
    "cfg": 1.0,
    "cache": CacheSpec("deepcache", threshold=0.15),
}


@pytest.fixture(scope="module")
def digits() -> Iterator[LoadedModel]:
    yield ModelStore(MODEL_STORE).load("digits")


@pytest.fixture(autouse=True)
def fixed_shape() -> Iterator[None]:
    yield
    STORE.fixed_shape = True


def _request(
    model: LoadedModel,
    label: int,
    sampler: str,
    steps: int,
    seed: int,
    n: int,
    cfg: float,
    cache: CacheSpec | None = None,
) -> JobRequest:
    cond, uncond = model.class_conditioning(torch.full([n], label, dtype=torch.long))
    cond[KEY], uncond[KEY] = cache_rows(cache, n), cache_rows(cache, n)
    return JobRequest(
        SamplingSpec(sampler, "karras", steps, [seed + i for i in range(n)]), n, cond, uncond, cfg
    )


def _sample(
    model: LoadedModel, bodies: list[dict], invariant_rows: int | None = CHUNK, group: bool = False
) -> list[torch.Tensor]:
    """All ``bodies`` submitted at the same instant to one engine: their sampled latents, in order
    (``group``: the scheduler puts rows that will reuse their cache first)."""
    hits = stepcache.predicted_hit if group else None
    handle = ModelHandle(
        "digits", model.denoiser, model.latent_shape, model.device, model.dtype, forget=stepcache.release,
        cache_hits=hits,
    )  # fmt: skip
    STORE.fixed_shape = invariant_rows is not None

    async def go() -> list[torch.Tensor]:
        engine = Engine(handle, EngineConfig(batch_wait_ms=0.0, invariant_rows=invariant_rows))
        jobs = [engine.submit(_request(model, **b)) for b in bodies]
        engine.start()
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        assert [j.status for j in jobs] == [JobStatus.succeeded] * len(jobs), [j.error for j in jobs]
        return [j.result for j in jobs]

    return run(go, timeout=120)


def test_mixed_batches_decide_per_row(digits: LoadedModel) -> None:
    plain, every3, by_change = (_sample(digits, [b])[0] for b in (PLAIN, EVERY3, BY_CHANGE))
    STORE.reset_counts()
    mixed = _sample(digits, [PLAIN, EVERY3, BY_CHANGE])
    assert torch.equal(mixed[0], plain)  # the uncached request: bit for bit its solo run
    assert (mixed[1] - every3).abs().max() < 1e-5
    assert (mixed[2] - by_change).abs().max() < 1e-5
    assert STORE.reused > 0 and len(STORE) == 0  # the cache was used, and every row is gone
    # the cache is not a no-op: without it the cached requests give other images
    uncached = _sample(digits, [{**EVERY3, "cache": None}, {**BY_CHANGE, "cache": None}])
    assert (uncached[0] - every3).abs().max() > 1e-3 and (uncached[1] - by_change).abs().max() > 1e-3


def test_without_fixed_shapes_the_skipped_part_runs_on_the_rows_that_need_it(digits: LoadedModel) -> None:
    alone = _sample(digits, [EVERY3], invariant_rows=None)[0]
    STORE.reset_counts()
    mixed = _sample(digits, [PLAIN, EVERY3], invariant_rows=None)
    assert (mixed[1] - alone).abs().max() < 1e-5  # rounding only: other call sizes
    assert STORE.padded == 0 and STORE.reused > 0


@torch.inference_mode()
def test_interval_1_and_threshold_0_are_the_plain_network(digits: LoadedModel) -> None:
    net = digits.denoiser.inner_model
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, *digits.latent_shape, generator=g), torch.rand(4, generator=g)
    label = torch.tensor([1, 2, 3, 10])
    want = net(x, t, class_cond=label)
    for spec in (CacheSpec("deepcache", interval=1), CacheSpec("deepcache", threshold=0.0)):
        rows = cache_rows(spec, 4)
        for _ in range(2):
            assert torch.equal(net(x, t, class_cond=label, cache=rows), want)


@torch.inference_mode()
def test_a_cached_evaluation_reuses_the_deep_features_of_the_last_full_one(digits: LoadedModel) -> None:
    """By hand: the first level down on the new input, the deep levels' output of the first input,
    the last level up. The traced model takes the same eager path for rows with a cache."""
    net = digits.denoiser.inner_model
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(2, 2, *digits.latent_shape, generator=g)
    t1, t2, label = torch.tensor([0.5, 0.5]), torch.tensor([0.3, 0.3]), torch.tensor([4, 10])
    rows = cache_rows(CacheSpec("deepcache", interval=2), 2)
    net(x1, t1, class_cond=label, cache=rows)
    got = net(x2, t2, class_cond=label, cache=rows)

    def first_level(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = net._cond(t, label, None)
        return net._down(net.proj_in(x), cond, None, net.down[:1], []), cond

    skip1, cond1 = first_level(x1, t1)
    skip2, cond2 = first_level(x2, t2)
    h = net._up(net.deep(skip1, cond1, None), cond2, None, net.up[-1:], [skip2])
    want = net.proj_out(torch.nn.functional.gelu(net.norm_out(h)))
    assert (got - want).abs().max() < 1e-6
    traced, rows2 = TracedModule(net), cache_rows(CacheSpec("deepcache", interval=2), 2)
    traced(x1, t1, class_cond=label, cache=rows2)
    assert torch.equal(traced(x2, t2, class_cond=label, cache=rows2), got) and not traced._traces


def test_rows_are_forgotten_when_their_tensor_goes() -> None:
    before = len(STORE)
    rows = cache_rows(CacheSpec("deepcache", interval=3), 3)
    assert len(STORE) == before + 3
    del rows
    gc.collect()
    assert len(STORE) == before


@pytest.mark.parametrize(
    ("spec", "methods", "field"),
    [
        (CacheSpec("deepcache", interval=0), ("deepcache",), "cache.interval"),
        (CacheSpec("deepcache", threshold=11.0), ("deepcache",), "cache.threshold"),
        (CacheSpec("deepcache", interval=2, threshold=0.1), ("deepcache",), "cache.interval"),
        (CacheSpec("teacache"), ("deepcache",), "cache.method"),
        (CacheSpec("fbcache"), ("deepcache",), "cache.method"),
        (CacheSpec("fbcache", interval=2), ("fbcache",), "cache.interval"),
        (CacheSpec("deepcache", start=20000), ("deepcache",), "cache.start"),
    ],
)
def test_bad_settings_name_the_field(spec: CacheSpec, methods: tuple[str, ...], field: str) -> None:
    with pytest.raises(InputError) as err:
        spec.resolved(methods)
    assert err.value.field == field


def test_defaults() -> None:
    assert CacheSpec("deepcache").resolved(("deepcache",)) == CacheSpec("deepcache", interval=3)
    assert CacheSpec("fbcache").resolved(("fbcache",)) == CacheSpec("fbcache", threshold=0.1)


def test_a_cancelled_or_failed_jobs_rows_are_forgotten(digits: LoadedModel) -> None:
    handle = ModelHandle(
        "digits", digits.denoiser, digits.latent_shape, digits.device, digits.dtype, forget=stepcache.release
    )
    long = {**EVERY3, "steps": 200}

    async def go() -> None:
        engine = Engine(handle, EngineConfig(batch_wait_ms=0.0, invariant_rows=CHUNK))
        engine.start()
        held = _request(digits, **long)  # held here: its tensors live, so only the engine can forget them
        cancelled = engine.submit(held)
        while cancelled.progress.evals < 2:  # running, with state for its rows
            await asyncio.sleep(0.01)
        assert len(STORE) > 0
        engine.cancel(cancelled)
        await cancelled.wait_done()
        assert len(STORE) == 0 and held.cond  # forgotten by the engine at the job's end
        slow = _request(digits, **long)
        slow.timeout_s = 0.2  # fails on its deadline, mid-run
        timed_out = engine.submit(slow)
        await timed_out.wait_done()
        assert len(STORE) == 0
        await engine.stop()
        assert (cancelled.status, timed_out.status) == (JobStatus.cancelled, JobStatus.failed)

    run(go, timeout=60)
    gc.collect()
    assert len(STORE) == 0


@torch.inference_mode()
@pytest.mark.parametrize("fixed", [True, False])
def test_lora_rows_keep_their_adapters_when_the_deep_part_runs_on_some_rows(
    tmp_path: Path, fixed: bool
) -> None:
    """Rows with LoRA a (interval 2), LoRA b (no cache), none (interval 2) in one call: at the second
    evaluation only the middle row runs the deep part; without fixed shapes it runs alone, with its
    own LoRA re-bound to it (bound_rows). Every row equals its own run with its LoRA."""
    from tests.models.test_lora_http import _store

    model = _store(tmp_path).load("tiny")
    adapters = attach(model, LoraIndex(tmp_path))
    assert adapters is not None
    STORE.fixed_shape = fixed
    loras = [adapters.resolve([("a", 0.5)]), adapters.resolve([("b", 1.0)]), []]
    specs = [CacheSpec("deepcache", interval=2), None, CacheSpec("deepcache", interval=2)]
    g = torch.Generator().manual_seed(6)
    steps = [
        (torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5.0, 2.0, 0.5]) / (k + 1)) for k in range(3)
    ]
    labels = torch.tensor([1, 2, 3])

    def evaluate(pick: list[int], cache: torch.Tensor) -> list[torch.Tensor]:
        lora = torch.cat([adapters.encode(loras[i], 1) for i in pick])
        with adapters.call(lora):
            return [model.denoiser(x[pick], s[pick], class_cond=labels[pick], cache=cache) for x, s in steps]

    held = [cache_rows(s, 1) for s in specs]
    STORE.reset_counts()
    mixed = evaluate([0, 1, 2], torch.cat(held))
    assert STORE.reused == 2 and STORE.padded == (2 if fixed else 0)
    for i, spec in enumerate(specs):
        own = cache_rows(spec, 1)
        alone = evaluate([i] * 3, own.expand(3, -1))
        for k in range(3):
            assert (alone[k][0] - mixed[k][i]).abs().max() <= 1e-5
    plain = evaluate([0, 1, 2], cache_rows(None, 3))
    assert (plain[0][1] - mixed[0][1]).abs().max() <= 1e-5 and (plain[1][0] - mixed[1][0]).abs().max() > 1e-4


def test_rows_that_will_reuse_their_cache_share_calls(digits: LoadedModel) -> None:
    """Uncached and interval-3 requests sent alternately: in arrival order every chunk of the call mixes
    both kinds, so (but for the last evaluations) no call skips the deep part; with the scheduler
    putting the rows that will reuse their cache first (ModelHandle.cache_hits) whole chunks skip it,
    and every image is the same."""
    bodies = [b for i in range(4) for b in ({**PLAIN, "n": 1, "seed": i}, {**EVERY3, "seed": 10 + i})]

    def sample(group: bool) -> tuple[list[torch.Tensor], int]:
        STORE.reset_counts()
        return _sample(digits, bodies, group=group), STORE.all_held

    (arrival, held_arrival), (grouped, held_grouped) = sample(False), sample(True)
    assert held_grouped >= held_arrival + 3, (held_arrival, held_grouped)
    assert all(torch.equal(a, b) for a, b in zip(arrival, grouped, strict=True))


@torch.inference_mode()
def test_start_runs_the_first_evaluations_in_full(digits: LoadedModel) -> None:
    """start 2, interval 2: evaluations 1 and 2 full, 3 reused, 4 full (without start: 2 and 4 reused);
    before its start a row is the plain network bit for bit."""
    net = digits.denoiser.inner_model
    g = torch.Generator().manual_seed(8)
    steps = [
        (torch.randn(2, *digits.latent_shape, generator=g), torch.rand(2, generator=g)) for _ in range(4)
    ]
    label = torch.tensor([3, 10])
    reused = []
    for start in (2, None):
        rows = cache_rows(CacheSpec("deepcache", interval=2, start=start), 2)
        STORE.reset_counts()
        outs = [net(x, t, class_cond=label, cache=rows) for x, t in steps]
        reused.append(STORE.reused)
        if start:
            assert all(torch.equal(outs[k], net(*steps[k], class_cond=label)) for k in (0, 1))
    assert reused == [2, 4]  # rows: 2 rows x (evaluation 3) vs 2 rows x (evaluations 2 and 4)
