"""Our upscaler networks against spandrel (the oracle: what A1111, ComfyUI and InvokeAI run) on the same
files: random weights under the published models' exact key names and shapes (ESRGAN x4's old layout,
Real-ESRGAN x4plus / x2plus under params_ema, realesr-general-x4v3's compact net under params; a SPAN
model's Conv3XC units), as .pth and .safetensors; untiled, and tiled (with the batching thread) against
spandrel's untiled output where the overlap covers the receptive field, and against spandrel run on
the same windows where not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from service.models.upscalers import UpscalerConfig, Upscalers
from service.models.upscalers.tiles import windows
from tests.support import upscaler_files as uf

ATOL = 2e-5

# (file name, state builder, .pth wrapper, scale, spandrel's architecture id)
PUBLISHED: list[tuple[str, Callable[[], dict[str, Tensor]], str | None, int, str]] = [
    ("RRDB_ESRGAN_x4", lambda: uf.esrgan_old(nb=23), None, 4, "ESRGAN"),
    ("RealESRGAN_x4plus", lambda: uf.esrgan_new(nb=23), "params_ema", 4, "ESRGAN"),
    ("RealESRGAN_x2plus", lambda: uf.esrgan_new(nb=23, unshuffle=2), "params_ema", 2, "ESRGAN"),
    ("realesr-general-x4v3", lambda: uf.compact(num_conv=32), "params", 4, "Compact"),
    ("4xNomos8k_span_otf", lambda: uf.span(nf=48), "params_ema", 4, "SPAN"),
]


def _ups(folder: Path, tile: int, overlap: int = 0, batch: int = 4) -> Upscalers:
    return Upscalers(folder, UpscalerConfig(tile=tile, overlap=overlap, batch=batch))


def _image(h: int, w: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    # a smooth gradient plus noise: real images are not white noise, and the values span 0..1
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2])[None]
    return (0.7 * base + 0.3 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    for name, build, wrapper, _, _ in PUBLISHED:
        state = build()
        uf.write(folder / f"{name}.pth", state, wrapper)
        uf.write(folder / "st" / f"{name}.safetensors", state)
    return folder


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", PUBLISHED, ids=[c[0] for c in PUBLISHED])
def test_untiled_equals_spandrel(published: Path, case: tuple, ext: str) -> None:
    name, _, _, scale, arch = case
    folder = published if ext == ".pth" else published / "st"
    run, s_scale, s_arch = uf.spandrel_model(folder / f"{name}{ext}")
    assert (s_scale, s_arch) == (scale, arch)
    ups = _ups(folder, tile=0)
    info = {i.name: i for i in ups.items()}[name]
    assert info.scale == scale and info.path == folder / f"{name}{ext}"
    x = _image(12, 16)  # x scale is a multiple of 8: A1111's target rounding leaves the size as is
    ours = ups.upscale(x, name, scale=float(scale))
    raw = run(x)
    want = raw.clamp(0, 1)
    assert ours.shape == want.shape == (1, 3, 12 * scale, 16 * scale)
    assert (ours - want).abs().max().item() < ATOL
    assert ((raw > 0) & (raw < 1)).float().mean() > 0.5  # mostly unclamped: the comparison bites


@pytest.mark.parametrize(
    ("build", "overlap"),
    [
        # the published layouts, fewer blocks: a receptive field the overlap covers (1 RRDB: 16 px;
        # x2plus, 1 RRDB at half resolution: ~36 px; 8 compact convs: 9 px), so tiled equals untiled
        (lambda: uf.esrgan_old(nb=1), 18),
        (lambda: uf.esrgan_new(nb=1, unshuffle=2), 40),
        (lambda: uf.compact(num_conv=8), 10),
        (lambda: uf.span(nf=16), 22),  # 20 3x3 convs in a row
    ],
    ids=["esrgan-old-1block", "esrgan-x2plus-1block", "compact-8convs", "span"],
)
def test_tiled_equals_spandrel_untiled_where_the_overlap_covers_the_receptive_field(
    tmp_path: Path, build: Callable[[], dict[str, Tensor]], overlap: int
) -> None:
    path = uf.write(tmp_path / "m.safetensors", build())
    run, scale, _ = uf.spandrel_model(path)
    x = _image(2 * overlap + 28, 2 * overlap + 44, seed=1)  # several tiles per axis; x scale: multiples of 8
    ups = _ups(tmp_path, tile=20, overlap=overlap, batch=3)
    ours = ups.upscale(x, "m", size=(x.shape[2] * scale, x.shape[3] * scale))
    want = run(x).clamp(0, 1)
    assert (ours - want).abs().max().item() < ATOL
    stats = ups.stats("m")
    assert stats is not None and stats.windows > 4 and stats.largest == 3  # batched tiles


def test_tiled_full_model_equals_spandrel_on_the_same_windows(published: Path) -> None:
    """RRDB_ESRGAN_x4 (23 blocks: a receptive field of ~350 px) in 16 px tiles with 8 px of overlap:
    each window's output kept inside its cell, exactly what spandrel gives for that window."""
    run, scale, _ = uf.spandrel_model(published / "RRDB_ESRGAN_x4.pth")
    x = _image(36, 44, seed=2)
    tile, overlap = 16, 8
    ours = _ups(published, tile=tile, overlap=overlap).upscale(x, "RRDB_ESRGAN_x4", scale=4.0)
    want = uf.spandrel_on_windows(run, x, scale, tile, overlap)
    shapes = {(ys.wstop - ys.wstart, xs.wstop - xs.wstart) for ys, xs in windows(36, 44, tile, overlap)}
    assert shapes == {(32, 32)}  # every window the same shape (so they batch)
    assert (ours - want).abs().max().item() < ATOL
    # and close to the untiled result (8 px of context at the seams of a 350 px receptive field)
    assert (ours - run(x).clamp(0, 1)).abs().mean().item() < 0.02
