"""Upscaler files for tests: random weights under the exact key names and shapes of the published
models (ESRGAN's RRDB_ESRGAN_x4.pth old layout; Real-ESRGAN's RealESRGAN_x4plus / x2plus basicsr layout
under ``params_ema``; realesr-general-x4v3's SRVGGNetCompact under ``params``), in .pth and
.safetensors; and spandrel (the oracle) loading the same file."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor


def _conv(g: torch.Generator, out_c: int, in_c: int, k: int = 3) -> tuple[Tensor, Tensor]:
    bound = 1 / math.sqrt(in_c * k * k)  # torch's default Conv2d init range
    w = (torch.rand(out_c, in_c, k, k, generator=g) * 2 - 1) * bound
    b = (torch.rand(out_c, generator=g) * 2 - 1) * bound
    return w, b


def _last(g: torch.Generator, nf: int) -> tuple[Tensor, Tensor]:
    """The last conv, its bias moved by +0.5: random weights give outputs around 0, and half of them
    would be clamped away; around 0.5 most pixels stay inside 0..1, where a comparison sees them."""
    w, b = _conv(g, 3, nf)
    return w, b + 0.5


def _put(state: dict[str, Tensor], key: str, wb: tuple[Tensor, Tensor]) -> None:
    state[f"{key}.weight"], state[f"{key}.bias"] = wb


def _rrdb_blocks(state: dict[str, Tensor], g: torch.Generator, nb: int, nf: int, gc: int, key: str) -> None:
    for i in range(nb):
        for r in range(1, 4):
            for c in range(1, 6):
                out_c = gc if c < 5 else nf
                _put(state, key.format(i=i, r=r, c=c), _conv(g, out_c, nf + (c - 1) * gc))


def esrgan_old(nb: int = 23, nf: int = 64, gc: int = 32, scale: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """RRDB_ESRGAN_x4.pth's layout: one nn.Sequential ``model.N``; the dense blocks' convs at ``.0``."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    _put(state, "model.0", _conv(g, nf, 3))
    _rrdb_blocks(state, g, nb, nf, gc, "model.1.sub.{i}.RDB{r}.conv{c}.0")
    _put(state, f"model.1.sub.{nb}", _conv(g, nf, nf))
    ups = int(math.log2(scale))
    for k in range(1, ups + 1):
        _put(state, f"model.{3 * k}", _conv(g, nf, nf))
    _put(state, f"model.{3 * ups + 2}", _conv(g, nf, nf))
    _put(state, f"model.{3 * ups + 4}", _last(g, nf))
    return state


def esrgan_new(
    nb: int = 23, nf: int = 64, gc: int = 32, unshuffle: int = 1, seed: int = 0
) -> dict[str, Tensor]:
    """RealESRGAN_x4plus.pth's layout (basicsr RRDBNet, always two 2x stages); ``unshuffle=2`` is
    RealESRGAN_x2plus (the first conv takes the pixel-unshuffled image: 12 channels)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    _put(state, "conv_first", _conv(g, nf, 3 * unshuffle**2))
    _rrdb_blocks(state, g, nb, nf, gc, "body.{i}.rdb{r}.conv{c}")
    _put(state, "conv_body", _conv(g, nf, nf))
    _put(state, "conv_up1", _conv(g, nf, nf))
    _put(state, "conv_up2", _conv(g, nf, nf))
    _put(state, "conv_hr", _conv(g, nf, nf))
    _put(state, "conv_last", _last(g, nf))
    return state


def compact(num_conv: int = 32, nf: int = 64, scale: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """realesr-general-x4v3.pth's layout (SRVGGNetCompact: num_feat 64, num_conv 32, PReLU, x4)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    _put(state, "body.0", _conv(g, nf, 3))
    state["body.1.weight"] = 0.25 + 0.05 * torch.randn(nf, generator=g)
    for i in range(num_conv):
        _put(state, f"body.{2 * i + 2}", _conv(g, nf, nf))
        state[f"body.{2 * i + 3}.weight"] = 0.25 + 0.05 * torch.randn(nf, generator=g)
    _put(state, f"body.{2 * num_conv + 2}", _conv(g, 3 * scale * scale, nf))
    return state


def write(path: Path, state: dict[str, Tensor], wrapper: str | None = None) -> Path:
    """``.pth``: torch.save, under ``wrapper`` as the published files are (params_ema / params);
    ``.safetensors``: the flat keys (how converted community files are shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrapper: state} if wrapper else state, str(path))
    return path


def _torchvision_stub() -> None:
    """spandrel imports torchvision at import time for two restoration architectures (LaMa,
    RestoreFormer) that these tests never load; where no torchvision matches the installed torch (the
    CPU-only wheel here), a stand-in whose functions refuse to run lets the rest of spandrel import."""
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision stand-in: not available in this test environment")

    root, transforms, functional = (
        types.ModuleType(n)
        for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    )
    functional.InterpolationMode = type("InterpolationMode", (), {})  # type: ignore[attr-defined]
    functional.rotate = refuse  # type: ignore[attr-defined]
    functional.normalize = refuse  # type: ignore[attr-defined]
    root.transforms, transforms.functional = transforms, functional  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "torchvision": root,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )


def spandrel_model(path: Path) -> tuple[Callable[[Tensor], Tensor], int, str]:
    """spandrel's own loader on the file: (inference on [B, 3, H, W] in 0..1, scale, architecture id)."""
    _torchvision_stub()
    import spandrel

    if getattr(sys.modules.get("torchvision"), "__spec__", True) is None:  # the stand-in (no spec)
        # spandrel holds what it took from the stand-in; out of sys.modules it cannot mislead a later
        # importlib.util.find_spec("torchvision") (transformers asks it while diffusers loads a model)
        for name in ("torchvision.transforms.functional", "torchvision.transforms", "torchvision"):
            sys.modules.pop(name, None)

    desc = spandrel.ModelLoader().load_from_file(str(path))
    model = desc.model.eval()

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x).float()

    return run, int(desc.scale), str(desc.architecture.id)


def span(nf: int = 48, scale: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """A SPAN file's layout (spandrel's: Conv3XC units with sk / conv.0-2 / eval_conv, six SPAB blocks,
    conv_cat, upsampler.0), e.g. 4xNomos8k_span_otf (48 features, x4)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}

    def unit(key: str, c_in: int, c_out: int) -> None:
        _put(state, f"{key}.sk", _conv(g, c_out, c_in, 1))
        _put(state, f"{key}.conv.0", _conv(g, 2 * c_in, c_in, 1))
        _put(state, f"{key}.conv.1", _conv(g, 2 * c_out, 2 * c_in, 3))
        _put(state, f"{key}.conv.2", _conv(g, c_out, 2 * c_out, 1))
        _put(state, f"{key}.eval_conv", _conv(g, c_out, c_in, 3))  # stale in real files too: recomputed

    unit("conv_1", 3, nf)
    for b in range(1, 7):
        for c in range(1, 4):
            unit(f"block_{b}.c{c}_r", nf, nf)
    _put(state, "conv_cat", _conv(g, nf, 4 * nf, 1))
    unit("conv_2", nf, nf)
    w, b = _conv(g, 3 * scale * scale, nf)
    # random weights give outputs of +-30; scaled so that most pixels land inside 0..1 (not clamped)
    state["upsampler.0.weight"], state["upsampler.0.bias"] = w * 0.01, b * 0.01 + 0.5
    return state


def spandrel_on_windows(
    run: Callable[[Tensor], Tensor], x: Tensor, scale: int, tile: int, overlap: int, align: int = 1
) -> Tensor:
    """What a tiled upscale must give: spandrel (``run``) on each window of ``tiles.windows``, clamped,
    each cell's part kept. Also checks that the cells cover the image exactly once."""
    from service.models.upscalers.tiles import windows

    h, w = x.shape[-2:]
    want = torch.empty(*x.shape[:-2], h * scale, w * scale)
    covered = torch.zeros(h, w, dtype=torch.int64)
    for ys, xs in windows(h, w, tile, overlap, align):
        covered[ys.start : ys.stop, xs.start : xs.stop] += 1
        out = run(x[..., ys.wstart : ys.wstop, xs.wstart : xs.wstop]).clamp(0, 1)
        oy, ox = (ys.start - ys.wstart) * scale, (xs.start - xs.wstart) * scale
        want[..., ys.start * scale : ys.stop * scale, xs.start * scale : xs.stop * scale] = out[
            ..., oy : oy + (ys.stop - ys.start) * scale, ox : ox + (xs.stop - xs.start) * scale
        ]
    assert bool((covered == 1).all())  # the cells cover the image exactly once
    return want


def gradient_image(h: int, w: int, seed: int = 0) -> Tensor:
    """A test image in [0, 1]: smooth gradients plus 30% noise (neither flat nor all noise, so window
    and shift errors in a network show)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (
        0.7 * torch.stack([yy, xx, (yy + xx) / 2])[None] + 0.3 * torch.rand(1, 3, h, w, generator=g)
    ).clamp(0, 1)
