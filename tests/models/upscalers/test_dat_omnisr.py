"""DAT and OmniSR against spandrel (the oracle) on the same files: random weights under the published
checkpoints' key names and shapes (tests/support/upscaler_files_dat.py), .pth (under ``params``, as the
DAT repository saves them) and .safetensors; image sizes that are not a multiple of the attention
window; untiled, and tiled through the batching thread against spandrel run on the same windows (both
nets have image-wide parts, channel attention and pooled gates, so tiled is not untiled)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from service.models.upscalers import UpscalerConfig, UpscalerLoadError, Upscalers, dat, omnisr
from service.models.upscalers.weights import load_net, read_state_dict
from tests.support import upscaler_files as uf
from tests.support import upscaler_files_dat as ud

ATOL = 2e-5

# (file, state builder, .pth wrapper or None for .safetensors, scale, spandrel's id, image h x w).
# Every block shaped as in the published model, fewer of them (the full stacks' detection is below).
CASES: list[tuple[str, Callable[[], dict[str, Tensor]], str | None, int, str, tuple[int, int]]] = [
    # DAT blocks (180 wide, 8x32 windows) in two groups (the odd group starts shifted); 13 x 21 pads
    # to 32 x 32 inside each spatial attention
    ("DAT_x4", lambda: ud.dat("DAT_x4", groups=[2, 1]), "params", 4, "DAT", (13, 21)),
    # DAT-S blocks (8x16 windows; x3: one 3x shuffle); 20 x 27 pads to 32 x 32
    ("DAT_S_x3", lambda: ud.dat("DAT_S_x3", groups=[2, 1]), "params", 3, "DAT", (20, 27)),
    # DAT-light blocks ("3conv" residuals, one-step upsampler) on a 64 x 64 image, the training size:
    # there spandrel uses the shift masks stored in the file (the even group's third block shifts),
    # we compute ours
    ("DAT_light_x4", lambda: ud.dat("DAT_light_x4", groups=[3]), None, 4, "DAT", (64, 64)),
    # OmniSR (64 wide, 8 px windows, the thop counters its files carry)
    ("OmniSR_X4_DIV2K", lambda: ud.omnisr(res_num=2), None, 4, "OmniSR", (13, 19)),
    ("OmniSR_X2", lambda: ud.omnisr(res_num=1, scale=2), "params", 2, "OmniSR", (17, 30)),
]


def _path(folder: Path, name: str, wrapper: str | None) -> Path:
    return folder / f"{name}{'.pth' if wrapper else '.safetensors'}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("upscalers")
    for name, build, wrapper, *_ in CASES:
        uf.write(_path(out, name, wrapper), build(), wrapper)
    return out


@pytest.fixture(scope="module")
def ups(folder: Path) -> Upscalers:
    """One registry for the module: each file loads once (and stays loaded) however many tests use it."""
    return Upscalers(folder, UpscalerConfig(tile=0, max_loaded=len(CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_untiled_equals_spandrel(folder: Path, ups: Upscalers, case: tuple) -> None:
    name, _, wrapper, scale, arch, (h, w) = case
    run, s_scale, s_arch = uf.spandrel_model(_path(folder, name, wrapper))
    assert (s_scale, s_arch) == (scale, arch)
    x = uf.gradient_image(h, w)
    # the network itself (A1111's upscale rounds targets to multiples of 8, these sizes are odd on purpose)
    net = ups._entry(name, _path(folder, name, wrapper), "upscaler").net
    with torch.inference_mode():
        ours = net.forward(x)
    raw = run(x)
    assert ours.shape == raw.shape == (1, 3, h * scale, w * scale)
    assert (ours - raw).abs().max().item() < ATOL
    assert ((raw > 0) & (raw < 1)).float().mean() > 0.6 and raw.std() > 0.04  # the comparison bites


def test_listed_with_family_and_scale(ups: Upscalers) -> None:
    """Not refused as non-commercial (DAT and OmniSR are Apache-2.0; spandrel's MIT package has them)."""
    info = {i.name: (i.family, i.scale) for i in ups.items()}
    assert {name: info[name] for name, *_ in CASES} == {
        name: (arch, float(scale)) for name, _, _, scale, arch, _ in CASES
    }


def test_detection_reads_the_published_hyper_parameters(tmp_path: Path, ups: Upscalers) -> None:
    """The full published stacks of DAT-light and OmniSR read back from their keys as the DAT
    repository's option files and OmniSR's defaults describe them (keys only: the forward passes are
    above); DAT and DAT-S windows, upsamplers and scales from the files above (DAT-2 is DAT's shapes with
    DAT-S's expansion: nothing the two do not cover)."""
    for name, want in [
        ("DAT_x4", ((2, 1), (6, 6), (8, 32), False, False, 4)),
        ("DAT_S_x3", ((2, 1), (6, 6), (8, 16), False, False, 3)),
    ]:
        n = ups._entry(name, next(ups.folder.glob(f"{name}.*")), "upscaler").net
        assert (n.depth, n.heads, n.split, n.direct, n.three_conv, n.scale) == want, name  # type: ignore[attr-defined]
    state = read_state_dict(uf.write(tmp_path / "DAT_light_x4.pth", ud.dat("DAT_light_x4"), "params"))
    assert dat.detect(state) and not omnisr.detect(state)
    net = dat.load(state)
    assert (net.depth, net.heads, net.split, net.direct, net.three_conv, net.scale) == (
        (18,),
        (6,),
        (8, 32),
        True,
        True,
        4,
    )
    state = read_state_dict(uf.write(tmp_path / "OmniSR_X4_DIV2K.safetensors", ud.omnisr()))
    assert omnisr.detect(state) and not dat.detect(state)
    omni = omnisr.load(state)
    assert (omni.groups, omni.blocks, omni.window, omni.scale) == (5, 1, 8, 4)


@pytest.mark.parametrize("name", ["DAT_S_x3", "OmniSR_X2"])
def test_tiled_equals_spandrel_on_the_same_windows(folder: Path, name: str) -> None:
    """12 px cells with 7 px of context: windows of 26 px, a multiple of neither net's window (each
    pads inside), four windows per model call; each cell is what spandrel gives for its window."""
    path = next(folder.glob(f"{name}.*"))
    run, scale, _ = uf.spandrel_model(path)
    x = uf.gradient_image(
        24, 32, seed=3
    )  # x 2 and x 3: multiples of 8, which A1111's upscale rounds the target to
    tile, overlap = 12, 7
    ups = Upscalers(folder, UpscalerConfig(tile=tile, overlap=overlap, batch=4))
    ours = ups.upscale(x, name, scale=float(scale))
    want = uf.spandrel_on_windows(run, x, scale, tile, overlap)
    assert (ours - want).abs().max().item() < ATOL
    stats = ups.stats(name)
    assert stats is not None and stats.largest == 4 and stats.windows == 6
    assert (ours - run(x).clamp(0, 1)).abs().mean().item() < 0.05  # and near the untiled image


def test_small_images_and_damaged_files(tmp_path: Path) -> None:
    """OmniSR pads below 16 px (its pooled gate needs that much; the published code refuses smaller
    inputs): a 5 x 3 image still upscales; a file without position bias tables equals spandrel's.
    A DAT file missing one weight fails its requests, naming it."""
    uf.write(tmp_path / "omni.safetensors", ud.omnisr(res_num=1, nf=16, pe=False))  # no position bias
    out = Upscalers(tmp_path).upscale(uf.gradient_image(5, 3), "omni", size=(20, 12))
    assert out.shape == (1, 3, 20, 12) and bool(torch.isfinite(out).all())
    run, _, _ = uf.spandrel_model(tmp_path / "omni.safetensors")
    x = uf.gradient_image(16, 20)
    with torch.inference_mode():
        assert (load_net(tmp_path / "omni.safetensors", False).forward(x) - run(x)).abs().max() < ATOL
    state = ud.dat("DAT_light_x4", groups=[2])
    del state["layers.0.blocks.1.ffn.fc2.weight"]
    uf.write(tmp_path / "broken_dat.pth", state, "params")
    with pytest.raises(UpscalerLoadError, match=r"broken_dat\.pth.*DAT.*fc2"):
        Upscalers(tmp_path).upscale(uf.gradient_image(8, 8), "broken_dat", scale=2.0)


def test_dat_runs_in_float32_where_the_models_are_float16(folder: Path) -> None:
    """spandrel marks DAT unsafe in float16 (not bfloat16): on a float16 service it loads in float32;
    OmniSR (float16-safe) takes the service's dtype."""
    ups = Upscalers(folder, UpscalerConfig(tile=0, dtype=torch.float16))
    names = ("DAT_light_x4", "OmniSR_X2")
    dtypes = {n: ups._entry(n, next(folder.glob(f"{n}.*")), "upscaler").net.dtype for n in names}
    assert dtypes == {"DAT_light_x4": torch.float32, "OmniSR_X2": torch.float16}
