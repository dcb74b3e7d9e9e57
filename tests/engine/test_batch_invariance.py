"""Batch invariance on the shipped digits model (a real UNet, not the elementwise fake): the same
seed gives the same image, bit for bit, alone or batched with any other requests.

A model call's float rounding depends on how many rows share it (the kernels and their blocking
follow the batch size), so the engine's batch-invariant mode runs every call at one fixed row count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.engine import Engine, EngineConfig, JobRequest, JobStatus, ModelHandle, ModelRunner
from service.models.store import LoadedModel, ModelStore
from service.models.traced import trace_denoiser
from service.sampling.spec import SamplingSpec
from tests.support.engine_fakes import run

STORE = Path(__file__).resolve().parents[2] / "model_store"
CHUNK = 8  # the service's default KDIFF_INVARIANT_ROWS

# issue 23 item 9: the first request alone, then sent at the same instant as the second
PROBE = {"label": 5, "sampler": "euler_ancestral", "steps": 30, "seed": 5095, "n": 2, "cfg": 3.0}
OTHER = {"label": 1, "sampler": "euler", "steps": 30, "seed": 1, "n": 1, "cfg": 3.0}
# a burst around it: other samplers, step counts, sizes and guidance, joining and leaving
BURST = [
    {"label": i % 10, "sampler": s, "steps": 6 + 3 * i, "seed": 100 + i, "n": 1 + i % 3, "cfg": 1.0 + i % 4}
    for i, s in enumerate(["dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde", "lms", "euler", "dpm_2"])
]


@pytest.fixture(scope="module", params=["eager", "traced"])
def digits(request: pytest.FixtureRequest) -> Iterator[LoadedModel]:
    model = ModelStore(STORE).load("digits")
    if request.param == "traced":  # what `kdiff serve` runs by default (KDIFF_JIT)
        assert trace_denoiser(model.denoiser)
    yield model


def _request(
    model: LoadedModel, label: int, sampler: str, steps: int, seed: int, n: int, cfg: float
) -> JobRequest:
    cond, uncond = model.class_conditioning(torch.full([n], label, dtype=torch.long))
    spec = SamplingSpec(
        sampler, "karras", steps, [seed + i for i in range(n)]
    )  # image i: seed + i, as the API
    return JobRequest(spec, n, cond, uncond, cfg)


def _sample(model: LoadedModel, bodies: list[dict], invariant_rows: int | None) -> list[torch.Tensor]:
    """Submit all ``bodies`` at the same instant to one engine; their sampled latents, in order."""
    handle = ModelHandle("digits", model.denoiser, model.latent_shape, model.device, model.dtype)

    async def go() -> list[torch.Tensor]:
        engine = Engine(handle, EngineConfig(batch_wait_ms=0.0, invariant_rows=invariant_rows))
        jobs = [engine.submit(_request(model, **b)) for b in bodies]
        engine.start()  # after the submissions: they are admitted together
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        assert [j.status for j in jobs] == [JobStatus.succeeded] * len(jobs), [j.error for j in jobs]
        return [j.result for j in jobs]

    return run(go, timeout=300)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b))


def test_same_seed_same_image_alone_with_another_request_and_in_a_burst(digits: LoadedModel) -> None:
    alone = _sample(digits, [PROBE], CHUNK)[0]
    assert _same(_sample(digits, [PROBE], CHUNK)[0], alone)  # run after run
    paired = _sample(digits, [PROBE, OTHER], CHUNK)
    assert _same(paired[0], alone)
    assert _same(paired[1], _sample(digits, [OTHER], CHUNK)[0])
    crowd = _sample(digits, [*BURST[:3], PROBE, *BURST[3:]], CHUNK)
    assert _same(crowd[3], alone)
    for body, got in zip(BURST[::3], crowd[::4], strict=False):  # a few of the others, alone
        assert _same(got, _sample(digits, [body], CHUNK)[0]), body


def test_calls_of_other_sizes_round_differently(digits: LoadedModel) -> None:
    """Why the mode exists, and that the test above can fail: without it a row computed alone and the
    same row inside a 17-row call differ (torch's kernels block by batch size); tiny, but not zero."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, *digits.latent_shape, generator=g) * 4
    sigma = torch.rand(17, generator=g) * 10 + 0.02
    label = torch.randint(0, 11, (17,), generator=g)
    rows = [0, 5, 16]
    handle = ModelHandle("digits", digits.denoiser, digits.latent_shape, digits.device, digits.dtype)
    for chunk, exact in ((None, False), (CHUNK, True)):
        runner = ModelRunner(handle, 64, chunk_rows=chunk)
        full = runner.denoise(x, sigma, {"class_cond": label})
        alone = torch.cat(
            [runner.denoise(x[i : i + 1], sigma[i : i + 1], {"class_cond": label[i : i + 1]}) for i in rows]
        )
        assert _same(full[rows], alone) is exact, chunk
        assert (full[rows] - alone).abs().max().item() < 1e-4  # rounding, not another output


def test_a_row_gives_the_same_output_at_every_position_of_a_fixed_size_call(digits: LoadedModel) -> None:
    """What the mode relies on: with the call's shape fixed, a row's output does not depend on its
    position in the call or on its neighbours' values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * CHUNK, *digits.latent_shape, generator=g) * 4
    sigma = torch.rand(3 * CHUNK, generator=g) * 10 + 0.02
    label = torch.randint(0, 11, (3 * CHUNK,), generator=g)
    handle = ModelHandle("digits", digits.denoiser, digits.latent_shape, digits.device, digits.dtype)
    runner = ModelRunner(handle, 64, chunk_rows=CHUNK)
    outs = []
    for position in range(CHUNK):
        order = torch.cat(
            [torch.arange(1, 1 + position), torch.tensor([0]), torch.arange(CHUNK + position, 2 * CHUNK)]
        )
        order = order[:CHUNK]
        outs.append(runner.denoise(x[order], sigma[order], {"class_cond": label[order]})[position])
    alone = runner.denoise(x[:1], sigma[:1], {"class_cond": label[:1]})[0]  # padded to CHUNK rows
    for out in outs:
        assert _same(out, alone)
    # and every call the runner made was CHUNK rows or, where that shape keeps every row's bits (seen
    # on the first such call by running it both ways), one call of a multiple of CHUNK
    calls: list[int] = []
    inner = handle.denoiser

    def counting(x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return inner(x, sigma, **cond)  # type: ignore[no-any-return]

    counted = ModelRunner(
        ModelHandle("digits", counting, digits.latent_shape, digits.device, digits.dtype),
        64,
        chunk_rows=CHUNK,
    )
    out13 = counted.denoise(x[:13], sigma[:13], {"class_cond": label[:13]})
    assert calls == [CHUNK, CHUNK, 2 * CHUNK] and out13.shape[0] == 13
    (wide,) = counted.wide.values()
    calls.clear()
    again = counted.denoise(x[:13], sigma[:13], {"class_cond": label[:13]})
    assert calls == ([2 * CHUNK] if wide else [CHUNK, CHUNK]) and torch.equal(again, out13)
