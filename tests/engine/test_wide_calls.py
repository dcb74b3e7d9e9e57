"""Batch-invariant mode's wide calls (engine/runner.py): a padded call of k chunks runs as one call
only where that shape was seen to give every row the bits of the chunked calls, so rows stay bit for
bit what they are alone whatever the kernels do."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from service.engine import ModelHandle, ModelRunner
from service.engine.runner import ROW_ADAPTERS
from service.models.lora import KEY as LORA
from service.models.lora import ModelAdapters
from service.models.stepcache import KEY as CACHE
from service.models.stepcache import CacheSpec, cache_rows
from service.models.store import ModelStore
from service.models.traced import trace_denoiser
from service.serving.pool import row_bound
from tests.engine.test_batch_invariance import BURST, PROBE, STORE, _sample

CHUNK = 8
SHAPE = (1, 4, 4)


class Counting:
    """Row-independent (elementwise) unless ``skew``: then a call of more than CHUNK rows rounds its
    output differently, as kernels that block by batch size do."""

    def __init__(self, skew: bool = False, oom_above: int | None = None, cpu_oom: bool = False) -> None:
        self.calls: list[int] = []
        self.observed: list[int] = []
        self.skew, self.oom_above, self.cpu_oom = skew, oom_above, cpu_oom

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            if self.cpu_oom:  # what torch's CPU allocator raises: a plain RuntimeError
                raise RuntimeError(
                    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
                )
            raise torch.OutOfMemoryError("simulated")
        out = x / (1 + sigma.view(-1, 1, 1, 1) ** 2)
        return out * (1 + 2**-20) if self.skew and x.shape[0] > CHUNK else out


def _runner(model: Counting, stateful: bool = False) -> ModelRunner:
    handle = ModelHandle("fake", model, SHAPE, torch.device("cpu"), torch.float32)
    handle.row_bound = (lambda cond: True) if stateful else None
    observed: list[int] = []
    runner = ModelRunner(handle, 64, chunk_rows=CHUNK, observe=observed.append)
    model.observed = observed  # what the metrics hook heard: every network call as run
    return runner


def _inputs(rows: int, seed: int = 0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *SHAPE, generator=g)
    return x, torch.rand(rows, generator=g) * 10, {"class_cond": torch.arange(rows) % 10}


def _alone(runner: ModelRunner, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return torch.cat(
        [
            runner.denoise(x[i : i + 1], sigma[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()})
            for i in range(x.shape[0])
        ]
    )


def test_a_shape_that_gives_the_same_bits_runs_as_one_call_after_the_first_check() -> None:
    model = Counting()
    runner = _runner(model)
    x, sigma, cond = _inputs(29)
    first = runner.denoise(x, sigma, cond)
    assert model.calls == [CHUNK] * 4 + [32]  # the chunks (their result kept), then the one-call check
    model.calls.clear()
    x2, s2, c2 = _inputs(30, seed=1)
    second = runner.denoise(x2, s2, c2)  # 30 rows: also 32 padded, the shape checked above
    assert model.calls == [32]
    assert model.observed == [CHUNK] * 4 + [32, 32]  # kdiff_network_call_rows
    assert torch.equal(first, _alone(runner, x, sigma, cond))
    assert torch.equal(second, _alone(runner, x2, s2, c2))


def test_a_shape_whose_bits_differ_stays_in_chunks_and_rows_stay_as_alone() -> None:
    model = Counting(skew=True)
    runner = _runner(model)
    x, sigma, cond = _inputs(20)
    outs = [runner.denoise(x, sigma, cond) for _ in range(3)]
    assert model.calls == [CHUNK] * 3 + [24] + [CHUNK] * 6  # checked once, then chunks only
    alone = _alone(runner, x, sigma, cond)
    assert all(torch.equal(o, alone) for o in outs)


def test_a_failing_one_call_check_never_fails_the_call() -> None:
    model = Counting(oom_above=CHUNK, cpu_oom=True)
    runner = _runner(model)
    x, sigma, cond = _inputs(20)
    out = runner.denoise(x, sigma, cond)  # the check (24 rows) fails: the chunks' result stands
    assert model.calls == [CHUNK] * 3 + [24] and runner.wide and not any(runner.wide.values())
    assert torch.equal(out, _alone(runner, x, sigma, cond))


def test_the_shapes_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.engine.runner.WIDE_SHAPES", 3)
    model = Counting()
    runner = _runner(model)
    for rows in (9, 17, 25, 33, 41):
        runner.denoise(*_inputs(rows))
    assert [key[0] for key in runner.wide] == [32, 40, 48]  # padded 16, 24, 32, 40, 48: the last three


def test_stateful_calls_and_per_row_adapters_never_run_wide_or_twice() -> None:
    model = Counting()
    runner = _runner(model, stateful=True)
    x, sigma, cond = _inputs(17)
    runner.denoise(x, sigma, cond)
    runner.denoise(x, sigma, cond)
    assert model.calls == [CHUNK] * 6 and not runner.wide
    plain = Counting()
    runner = _runner(plain)
    runner.handle.row_adapters = lambda rows: torch.no_grad()  # any context: the call's adapter hook
    runner.denoise(x, sigma, {**cond, ROW_ADAPTERS: torch.zeros(17, 2)})
    assert plain.calls == [CHUNK] * 3 and not runner.wide


@pytest.mark.parametrize("cpu_oom", [False, True], ids=["OutOfMemoryError", "CPU allocator RuntimeError"])
def test_a_wide_call_out_of_memory_goes_back_to_chunks_of_the_same_size(cpu_oom: bool) -> None:
    model = Counting(cpu_oom=cpu_oom)
    runner = _runner(model)
    x, sigma, cond = _inputs(16)
    runner.denoise(x, sigma, cond)  # checked: same bits
    model.oom_above = CHUNK
    model.calls.clear()
    out = runner.denoise(x, sigma, cond)
    assert model.calls == [16, CHUNK, CHUNK] and runner.chunk_rows == CHUNK
    assert torch.equal(out, _alone(runner, x, sigma, cond))
    model.calls.clear()
    runner.denoise(x, sigma, cond)
    assert model.calls == [CHUNK, CHUNK]  # that shape stays chunked


@pytest.fixture(scope="module")
def two_threads() -> Iterator[None]:
    """The service's default on this machine (torch's threads = cores): the kernels block differently
    with two threads, which is where the digits UNet's wide calls were seen to keep the bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_digits_burst_gives_the_solo_image_with_wide_calls_decided_on_the_real_unet(
    two_threads: None,
) -> None:
    model = ModelStore(STORE).load("digits")
    assert trace_denoiser(model.denoiser)
    alone = _sample(model, [PROBE], CHUNK)[0]
    crowd = _sample(model, [*BURST[:3], PROBE, *BURST[3:]], CHUNK)
    assert torch.equal(crowd[3], alone)
    for body, got in zip(BURST[::3], crowd[::4], strict=False):
        assert torch.equal(got, _sample(model, [body], CHUNK)[0]), body


def test_the_services_rows_bound_predicate_reads_real_adapter_and_cache_rows() -> None:
    """What the pool gives its engines (serving/pool.row_bound), on the tensors requests really carry:
    every request to a LoRA-capable model has the adapter rows (id -1 = none), and every request to a
    cache-capable model the cache rows (id 0 = none); only live ones bind a call's shape."""
    none = {LORA: ModelAdapters.encode([], 3), CACHE: cache_rows(None, 3), "class_cond": torch.zeros(3)}
    assert not row_bound(none)
    assert not row_bound({**none, LORA: ModelAdapters.encode([(0, 0.0)], 3)})  # weight 0: no adapter
    assert row_bound({**none, LORA: ModelAdapters.encode([(0, 0.8)], 3)})
    assert row_bound(
        {**none, LORA: torch.cat([ModelAdapters.encode([], 2), ModelAdapters.encode([(2, 1)], 1)])}
    )
    assert row_bound({**none, CACHE: cache_rows(CacheSpec("deepcache", interval=3), 3)})
