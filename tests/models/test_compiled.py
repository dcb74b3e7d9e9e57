"""KDIFF_COMPILE: torch.compile'd networks equal eager (float32, 1e-5), bucket padding never changes a
real row, and any compile failure or mismatch stays eager with a warning.

Compiling is slow on this machine (minutes per graph for the digits UNet under load), so each test
module compiles one tiny network once, at one or two small buckets; the digits UNet is `-m slow`.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import Tensor

from service.api.app import create_app
from service.api.settings import Settings
from service.models.compiled import CompiledModule, compile_denoiser, default_buckets, pad_rows
from service.models.store import LoadedModel, ModelStore
from service.models.unet import UNetConfig
from tests.support.tiny_store import make_tiny_store

from .test_unet import TINY, randomized

TOL = dict(rtol=1e-5, atol=1e-5)


def _cond(b: int) -> dict[str, Tensor]:
    return {"class_cond": torch.arange(b) % 4}


@pytest.fixture(scope="module")
def unet_compiled() -> CompiledModule:
    """The tiny project UNet compiled at one bucket of 4 rows (one graph for the whole module)."""
    torch._dynamo.reset()
    return CompiledModule(randomized(UNetConfig(**TINY, num_classes=3)), [4], label="tiny unet")


def test_default_buckets_are_powers_of_two_up_to_the_row_limit() -> None:
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert default_buckets(1) == [1]


def test_compiled_unet_equals_eager_at_every_row_count(unet_compiled: CompiledModule) -> None:
    torch.manual_seed(0)
    with torch.inference_mode():
        for b in (3, 1, 2, 4, 7):  # 7 rows: chunks of the largest bucket (4 + 3 padded to 4)
            x, c_noise, cond = torch.randn(b, 1, 8, 8), torch.randn(b), _cond(b)
            got = unet_compiled(x, c_noise, **cond)
            torch.testing.assert_close(got, unet_compiled.inner(x, c_noise, **cond), **TOL)
    assert [s for _, s in unet_compiled._graphs] == [4]  # one graph, not one per row count
    assert all(unet_compiled._graphs.values())  # each compiled and checked against eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled, not eager


def test_padding_rows_never_change_the_real_rows(unet_compiled: CompiledModule) -> None:
    """Whatever the padding rows hold, the real rows' outputs are bit-identical."""
    torch.manual_seed(1)
    x, c_noise, cond = torch.randn(3, 1, 8, 8), torch.randn(3), _cond(3)
    with torch.inference_mode():
        through = unet_compiled(x, c_noise, **cond)  # padded with copies of the last row
        outs = []
        for seed in (2, 3):
            g = torch.Generator().manual_seed(seed)
            xp = torch.cat([x, torch.randn(1, 1, 8, 8, generator=g) * 10])
            tp = torch.cat([c_noise, torch.randn(1, generator=g)])
            yp = torch.cat([cond["class_cond"], torch.tensor([seed])])
            outs.append(unet_compiled(xp, tp, class_cond=yp)[:3])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], through)


def test_pad_rows_repeats_the_last_row() -> None:
    (x,), cond = pad_rows([torch.arange(3.0)], {"c": torch.tensor([[1], [2], [3]])}, 5)
    assert x.tolist() == [0, 1, 2, 2, 2] and cond["c"].flatten().tolist() == [1, 2, 3, 3, 3]


def test_grad_mode_and_bypass_run_eager(unet_compiled: CompiledModule) -> None:
    x, c_noise = torch.randn(3, 1, 8, 8), torch.randn(3)
    before = dict(unet_compiled._graphs)
    assert unet_compiled(x, c_noise, **_cond(3)).requires_grad
    unet_compiled.bypass = True
    try:
        with torch.inference_mode():
            torch.testing.assert_close(
                unet_compiled(x[:1], c_noise[:1], class_cond=torch.tensor([1])),
                unet_compiled.inner(x[:1], c_noise[:1], class_cond=torch.tensor([1])),
                rtol=0,
                atol=0,
            )
    finally:
        unet_compiled.bypass = False
    assert unet_compiled._graphs == before


def _raising_backend(gm: Any, example_inputs: Any) -> Any:
    raise RuntimeError("backend refuses this graph")


def _wrong_backend(gm: Any, example_inputs: Any) -> Any:
    def run(*args: Any) -> Any:
        return [o + 1e-3 for o in gm(*args)]

    return run


@pytest.mark.parametrize(
    "backend, why", [(_raising_backend, "refuses"), (_wrong_backend, "differs from eager")]
)
def test_a_failing_or_wrong_compile_stays_eager_with_a_warning(
    backend: Callable[..., Any], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    eager = randomized(UNetConfig(**TINY))
    module = CompiledModule(eager, [4], backend=backend, label="broken")
    x, c_noise = torch.randn(3, 1, 8, 8), torch.randn(3)
    with caplog.at_level(logging.WARNING, logger="service.models.compiled"), torch.inference_mode():
        got = module(x, c_noise)
        again = module(x, c_noise)
        want = eager(x, c_noise)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert list(module._graphs.values()) == [False]
    assert "staying eager" in caplog.text and why in caplog.text


def test_torch_compile_raising_serves_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no compiler on this platform")

    monkeypatch.setattr(torch, "compile", refuse)
    eager = randomized(UNetConfig(**TINY))
    with caplog.at_level(logging.WARNING, logger="service.models.compiled"):
        module = CompiledModule(eager, [2])
    x, c_noise = torch.randn(2, 1, 8, 8), torch.randn(2)
    with torch.inference_mode():
        assert torch.equal(module(x, c_noise), eager(x, c_noise))
    assert "torch.compile failed, serving eager: no compiler" in caplog.text


# --- the tiny text-to-image families, loaded by the real loaders ---


def _family_case(store: Path, name: str, prompt: str) -> Iterator[tuple[LoadedModel, CompiledModule, Any]]:
    model = ModelStore(store).load(name)
    eager = model.denoiser
    wrapped = compile_denoiser(model.denoiser, [2], model.example_input(), label=name)
    assert isinstance(wrapped, CompiledModule) and all(wrapped._graphs.values())
    cond = model.text_model.job_inputs(prompt, None, n=2, cfg_scale=1.0).cond  # type: ignore[attr-defined]
    yield model, wrapped, cond
    assert eager is model.denoiser


@pytest.fixture(scope="module")
def tiny_sd() -> Iterator[tuple[LoadedModel, CompiledModule, Any]]:
    from tests.support.sd_tiny import tiny_sd_store

    yield from _family_case(tiny_sd_store(), "sd1", "a red cat")


@pytest.fixture(scope="module")
def tiny_flux() -> Iterator[tuple[LoadedModel, CompiledModule, Any]]:
    from tests.support.flow_tiny import tiny_flow_store

    yield from _family_case(tiny_flow_store(), "flux_dev", "a red cat")


@pytest.mark.parametrize("case", ["tiny_sd", "tiny_flux"])
def test_compiled_text_models_equal_eager(case: str, request: pytest.FixtureRequest) -> None:
    model, wrapped, cond = request.getfixturevalue(case)
    torch.manual_seed(0)
    x = torch.randn(2, *model.latent_shape)
    sigma = torch.tensor([0.9, 0.3]) if case == "tiny_flux" else torch.tensor([10.0, 1.0])
    with torch.inference_mode():
        for rows in (2, 1):  # 1 row: padded to the 2-row graph made at load
            part = {k: v[:rows] for k, v in cond.items()}
            got = model.denoiser(x[:rows], sigma[:rows], **part)
            wrapped.bypass = True  # the same denoiser with its eager network
            try:
                want = model.denoiser(x[:rows], sigma[:rows], **part)
            finally:
                wrapped.bypass = False
            torch.testing.assert_close(got, want, **TOL)
    assert list(wrapped._graphs.values()) == [True]  # the load-time graph served the prompt


# --- through the service ---


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("compile-store"))


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def test_service_with_compile_on_serves_the_eager_image(
    tiny_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "tiny", "steps": 3, "seed": 5, "class_label": 2, "n": 3}
    images = {}
    for compile_on in (True, False):
        settings = Settings(
            model_store=tiny_store,
            torch_threads=1,
            batch_wait_ms=0,
            jit=False,
            compile=compile_on,
            compile_buckets=[4],
        )
        with caplog.at_level(logging.INFO), TestClient(create_app(settings)) as client:
            r = client.post("/sample", json=body)
            assert r.status_code == 200, r.text
            inner = client.app.state.service.pool.models["tiny"].denoiser.inner_model  # type: ignore[attr-defined]
            assert isinstance(inner, CompiledModule) is compile_on
            if compile_on:
                assert list(inner._graphs.values()) == [True]
            images[compile_on] = r.json()
    assert "model tiny: compiling bucket 1/1 (4 rows)" in caplog.text
    got, want = (images[k]["images"] for k in (True, False))
    assert len(got) == 3
    for a, b in zip(got, want, strict=True):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1  # PNG 8-bit: within one level


@pytest.mark.slow
def test_compiled_digits_unet_equals_eager() -> None:
    """The shipped digits UNet (one bucket: ~4-5 min of compiling on this machine under load)."""
    repo = Path(__file__).resolve().parents[2]
    model = ModelStore(repo / "model_store").load("digits")
    eager = model.denoiser.inner_model
    wrapped = compile_denoiser(model.denoiser, [2], model.example_input(), label="digits")
    assert wrapped is not None and all(wrapped._graphs.values())
    torch.manual_seed(0)
    x, c_noise = torch.randn(2, *model.latent_shape), torch.randn(2)
    cond = {"class_cond": torch.tensor([3, 10])}
    with torch.inference_mode():
        torch.testing.assert_close(wrapped(x, c_noise, **cond), eager(x, c_noise, **cond), **TOL)
