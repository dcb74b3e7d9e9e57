"""SwinIR and HAT against spandrel (the oracle A1111, ComfyUI and InvokeAI run) on the same files: random
weights under the published checkpoints' key names (SwinIR classical x2/x4 "pixelshuffle", lightweight
"pixelshuffledirect", real-world "nearest+conv" with 3conv, the window-7 JPEG model; HAT, HAT-S's
compression widths, a 16-px window), as .pth under params / params_ema and as .safetensors; sizes that
are not multiples of the window (both nets pad by reflection, as the reference does); untiled, and
tiled through the batching thread against spandrel run on the same windows (a transformer's receptive
field is the whole window, so tiled equals spandrel per window, not spandrel untiled)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from service.models.upscalers import UpscalerConfig, Upscalers
from tests.support import upscaler_files as uf
from tests.support import upscaler_files_swin as us

ATOL = 1e-4  # float32; measured differences are below 1e-6

# (file name, state builder, .pth wrapper, scale, spandrel's architecture id = A1111's family); the
# ones without a wrapper go in a .safetensors file (flat keys: how converted files are shared)
FILES: list[tuple[str, Callable[[], dict[str, Tensor]], str | None, int, str]] = [
    ("SwinIR-M_x4", lambda: us.swinir(scale=4), "params_ema", 4, "SwinIR"),
    ("SwinIR-M_x2", lambda: us.swinir(us.Dims(depths=(2, 1), heads=3), scale=2), None, 2, "SwinIR"),
    (
        "SwinIR-S_x4",
        lambda: us.swinir(us.Dims(embed=12), upsampler="pixelshuffledirect"),
        "params",
        4,
        "SwinIR",
    ),
    ("SwinIR-L_x4_GAN", lambda: us.swinir(upsampler="nearest+conv", resi="3conv"), "params_ema", 4, "SwinIR"),
    ("SwinIR-M_x2_GAN", lambda: us.swinir(upsampler="nearest+conv", scale=2), None, 2, "SwinIR"),
    (
        "SwinIR_jpeg",
        lambda: us.swinir(us.Dims(window=7), upsampler="", scale=1, img_size=28),
        "params",
        1,
        "SwinIR",
    ),
    ("HAT_SRx4", lambda: us.hat(), "params_ema", 4, "HAT"),
    ("HAT-S_SRx2", lambda: us.hat(us.Dims(24, heads=2), cab=(24, 24), scale=2), None, 2, "HAT"),
    ("HAT-L_w16_x2", lambda: us.hat(us.Dims(30, (1, 1), 3, 16), scale=2), "params_ema", 2, "HAT"),
]


def _path(root: Path, name: str) -> Path:
    return next(root.glob(f"{name}.*"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("swin")
    for name, build, wrapper, _, _ in FILES:
        uf.write(root / (name + (".pth" if wrapper else ".safetensors")), build(), wrapper)
    return root


@pytest.mark.parametrize("case", FILES, ids=[c[0] for c in FILES])
def test_untiled_equals_spandrel(folder: Path, case: tuple) -> None:
    name, _, _, scale, arch = case
    run, s_scale, s_arch = uf.spandrel_model(_path(folder, name))
    assert (s_scale, s_arch) == (scale, arch)
    ups = Upscalers(folder, UpscalerConfig(tile=0))
    info = {i.name: i for i in ups.items()}[name]
    assert (info.family, info.scale) == (arch, scale)
    # 12 x 20: no multiple of 7, 8 or 16; times the scale a multiple of 8, so A1111's rounding of the
    # target (//8 * 8) leaves the model's output as it is
    h, w = (16, 24) if scale == 1 else (12, 20)
    x = torch.cat([uf.gradient_image(h, w, seed=1), uf.gradient_image(h, w, seed=2)])
    if scale == 1:
        ours = ups.upscale(x, name, scale=1.0)
    else:
        ours = ups.upscale(x, name, size=(h * scale, w * scale))
    raw = run(x)
    assert ours.shape == raw.shape == (2, 3, h * scale, w * scale)
    assert (ours - raw.clamp(0, 1)).abs().max().item() < ATOL
    assert ((raw > 0) & (raw < 1)).float().mean() > 0.6  # mostly unclamped: the comparison bites
    assert raw.std() > 0.05  # and not a flat grey


@pytest.mark.parametrize("name", ["SwinIR-S_x4", "HAT_SRx4"])
def test_tiled_equals_spandrel_on_the_same_windows(folder: Path, name: str) -> None:
    """12 px cells with 6 px of context (windows of 24, padded by the net to its window multiple),
    four windows per model call: each cell is what spandrel gives for its window."""
    run, scale, _ = uf.spandrel_model(folder / f"{name}.pth")
    x = uf.gradient_image(30, 38, seed=3)  # x 4: multiples of 8 (A1111's target rounding)
    tile, overlap = 12, 6
    ups = Upscalers(folder, UpscalerConfig(tile=tile, overlap=overlap, batch=4))
    ours = ups.upscale(x, name, scale=4.0)
    want = uf.spandrel_on_windows(run, x, scale, tile, overlap)
    assert (ours - want).abs().max().item() < ATOL
    stats = ups.stats(name)
    assert stats is not None and stats.largest == 4  # tiles batched into one call
    assert (ours - run(x).clamp(0, 1)).abs().mean().item() < 0.05  # and near the untiled image


@pytest.mark.parametrize("name", ["SwinIR-M_x4", "HAT_SRx4"])
def test_attention_in_chunks_equals_spandrel(
    folder: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the score budget cut to about 3 windows, windows go through attention 2-3 at a time; the
    chunks do not line up with the images or with the shifted-window masks' rows (12 windows each
    image), and the result is still spandrel's."""
    from service.models.upscalers import swin

    monkeypatch.setattr(swin, "ATTN_SCORES", 3 * 3 * 64 * 144)  # 3 heads x 64 queries x 144 keys (HAT's OCAB)
    run, scale, _ = uf.spandrel_model(_path(folder, name))
    x = torch.cat([uf.gradient_image(24, 32, seed=5), uf.gradient_image(24, 32, seed=6)])
    ours = Upscalers(folder, UpscalerConfig(tile=0)).upscale(x, name, scale=float(scale))
    assert (ours - run(x).clamp(0, 1)).abs().max().item() < ATOL


def test_unshuffled_input_equals_spandrel(tmp_path: Path) -> None:
    """conv_first.1 (a 2x pixel-unshuffle before the first conv) on a 4x pixelshuffle net: a 2x
    upscaler. spandrel pads only to the window, so it runs where the size is a multiple of window * 2
    (32 x 48 here); ours pads to that multiple, so other sizes work too."""
    path = uf.write(tmp_path / "unshuffled.safetensors", us.swinir(unshuffle=2, img_size=16))
    run, scale, _ = uf.spandrel_model(path)
    ups = Upscalers(tmp_path, UpscalerConfig(tile=0))
    assert scale == 2 and {i.name: i.scale for i in ups.items()}["unshuffled"] == 2
    x = uf.gradient_image(32, 48, seed=4)
    raw = run(x)
    assert (ups.upscale(x, "unshuffled", scale=2.0) - raw.clamp(0, 1)).abs().max().item() < ATOL
    assert raw.std() > 0.05
    assert ups.upscale(uf.gradient_image(12, 20), "unshuffled", scale=2.0).shape == (1, 3, 24, 40)


def test_images_smaller_than_half_a_window(tmp_path: Path) -> None:
    """A 16-px window over a 5 x 3 or a 1 x 9 input (a thin strip, a small last tile): one reflection
    cannot pad it (spandrel raises); ours reflects again from the padded edge (replicates a 1-px side),
    so such inputs still upscale, and a 5-px-high image goes through the service."""
    from service.models.upscalers.weights import load_net

    path = uf.write(tmp_path / "hat16.safetensors", us.hat(us.Dims(30, (1,), 3, 16), scale=2))
    net = load_net(path, False)
    with torch.inference_mode():
        for h, w in [(5, 3), (1, 9)]:
            out = net.forward(uf.gradient_image(h, w))
            assert out.shape == (1, 3, 2 * h, 2 * w) and bool(torch.isfinite(out).all())
    assert Upscalers(tmp_path).upscale(uf.gradient_image(5, 12), "hat16", scale=2).shape == (1, 3, 8, 24)


def test_detection_reads_hyper_parameters_from_the_keys(folder: Path) -> None:
    from service.models.upscalers.weights import load_net

    net = load_net(_path(folder, "SwinIR-M_x2"), False)
    assert (net.window, net.depths, net.heads, net.upsampler, net.scale) == (
        8,
        (2, 1),
        (3, 3),
        "pixelshuffle",
        2,
    )  # type: ignore[attr-defined]
    jpeg = load_net(folder / "SwinIR_jpeg.pth", False)
    assert (jpeg.window, jpeg.img_range, jpeg.scale) == (7, 255.0, 1)  # type: ignore[attr-defined]
    real = load_net(folder / "SwinIR-L_x4_GAN.pth", False)
    assert (real.upsampler, "conv_after_body.4.weight" in real.w) == ("nearest+conv", True)  # type: ignore[attr-defined]
    assert real.to("cpu", torch.float16).dtype == torch.float32  # no half precision (as spandrel)
    big = load_net(folder / "HAT-L_w16_x2.pth", False)
    assert (big.window, big.overlap, big.scale, big.depths) == (16, 24, 2, (1, 1))  # type: ignore[attr-defined]


TABLE = "layers.0.residual_group.blocks.0.attn.relative_position_bias_table"
OCA_TABLE = "layers.0.residual_group.overlap_attn.relative_position_bias_table"


@pytest.mark.parametrize(
    ("state", "why"),
    [
        # a bias table that fits no window; one with no heads (a division by zero if unchecked)
        (lambda: {**us.swinir(), TABLE: torch.zeros(200, 2)}, "looks like SwinIR but .* 200 rows"),
        (
            lambda: {**us.swinir(), TABLE: torch.zeros(225, 0)},
            "looks like SwinIR but groups of .* heads \\(0,\\)",
        ),
        # declared sizes that would ask the probe for unbounded memory: a 65-px window, a 32x scale,
        # an overlapping window wider than twice the window
        (lambda: {**us.swinir(), TABLE: torch.zeros(129 * 129, 2)}, "window of 65 px; at most 64"),
        (
            lambda: {
                **us.swinir(upsampler="nearest+conv"),
                **{f"conv_up{k}.weight": torch.zeros(64, 64, 3, 3) for k in (3, 4, 5)},
            },
            "a scale of 32; at most 16",
        ),
        (
            lambda: {**us.hat(), OCA_TABLE: torch.zeros(25 * 25, 3)},
            "looks like HAT but an overlapping-attention table",
        ),
    ],
    ids=["table-shape", "no-heads", "huge-window", "huge-scale", "huge-overlap"],
)
def test_damaged_or_hostile_files_fail_their_own_requests(tmp_path: Path, state, why: str) -> None:  # type: ignore[no-untyped-def]
    from service.models.upscalers import UpscalerLoadError

    uf.write(tmp_path / "bad.pth", state())
    with pytest.raises(UpscalerLoadError, match=r"'bad' \(bad.pth\) cannot be used: .*" + why):
        Upscalers(tmp_path).upscale(uf.gradient_image(8, 8), "bad", scale=2)


def test_swin2sr_is_not_taken_for_swinir(tmp_path: Path) -> None:
    """Swin2SR has SwinIR's keys plus patch_embed.proj (spandrel tries it first): not ours."""
    from service.models.upscalers import UpscalerLoadError

    state = us.swinir(scale=2)
    uf.write(tmp_path / "swin2sr.pth", {**state, "patch_embed.proj.weight": torch.zeros(24, 3, 1, 1)})
    with pytest.raises(UpscalerLoadError, match="no supported architecture"):
        Upscalers(tmp_path).upscale(uf.gradient_image(8, 8), "swin2sr", scale=2)
