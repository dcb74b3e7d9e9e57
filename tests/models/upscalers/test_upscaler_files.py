"""What the upscalers folder may hold and how each file is judged: architectures detected from keys,
non-commercial ones refused unless allowed, corrupt files failing only their own requests; A1111's
pass rule (model passes until the target is covered, then Lanczos); tiles of concurrent requests in
one model call."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from service.models.upscalers import UnknownUpscaler, UpscalerConfig, UpscalerLoadError, Upscalers
from service.models.upscalers.resize import LANCZOS, pil_resize
from tests.support import upscaler_files as uf


def _small_esrgan() -> dict[str, torch.Tensor]:
    return uf.esrgan_old(nb=1, nf=8, gc=4)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    uf.write(tmp_path / "4x-small.pth", _small_esrgan())
    uf.write(tmp_path / "compact.safetensors", uf.compact(num_conv=2, nf=8))
    return tmp_path


def test_names_and_items(folder: Path) -> None:
    (folder / "notes.txt").write_text("not a model")
    ups = Upscalers(folder)
    assert ups.names() == ["None", "Lanczos", "Nearest", "4x-small", "compact"]
    items = {i.name: (i.family, i.scale) for i in ups.items()}
    assert items["4x-small"] == ("ESRGAN", 4.0) and items["compact"] == ("RealESRGAN", 4.0)
    assert items["None"] == (None, 4.0)


def test_unknown_name_lists_the_available(folder: Path) -> None:
    with pytest.raises(UnknownUpscaler) as err:
        Upscalers(folder).upscale(torch.rand(1, 3, 8, 8), "R-ESRGAN 4x+", scale=2, field="hr_upscaler")
    assert err.value.field == "hr_upscaler" and err.value.allowed == Upscalers(folder).names()
    assert "R-ESRGAN 4x+" in err.value.message and "4x-small" in err.value.message


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _code_pickle(path: Path) -> None:
    """A .pth whose pickle calls a function when loaded: weights_only refuses to run it."""

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("ran code from a model file",))

    torch.save({"model.0.weight": Evil()}, str(path))


def _srformer(path: Path) -> None:
    keys = (
        "layers.0.residual_group.blocks.0.norm1.weight",
        "layers.0.residual_group.blocks.0.attn.aligned_relative_position_index",
        "conv_first.weight",
        "layers.0.residual_group.blocks.0.mlp.fc1.bias",
    )
    uf.write(path, {k: torch.zeros(4) for k in keys})


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_truncated, "not a readable .pth file"),
        (lambda p: p.write_bytes(b"\x00" * 64), "not a readable .pth file"),
        (_code_pickle, "not a readable .pth file"),
        (lambda p: uf.write(p, {"conv.weight": torch.zeros(3, 3, 3, 3)}), "no supported architecture"),
        (
            lambda p: uf.write(p, {**_small_esrgan(), "model.0.weight": torch.zeros(8, 5, 3, 3)}),
            "looks like ESRGAN",
        ),
        (_srformer, "SRFormer is under a non-commercial licence.*KDIFF_UPSCALER_NONCOMMERCIAL"),
    ],
    ids=["truncated", "zeros", "pickle-with-code", "unknown-keys", "wrong-shape", "noncommercial"],
)
def test_a_bad_file_fails_only_its_own_requests(folder: Path, make, why: str) -> None:  # type: ignore[no-untyped-def]
    bad = folder / "bad.pth"
    uf.write(bad, _small_esrgan())
    make(bad)
    ups = Upscalers(folder)
    x = torch.rand(1, 3, 8, 8)
    for _ in range(2):  # the second time from the remembered error, not a re-read
        with pytest.raises(UpscalerLoadError, match=why) as err:
            ups.upscale(x, "bad", scale=4, field="upscaler_1")
        assert err.value.field == "upscaler_1" and "'bad' (bad.pth)" in err.value.message
    assert ups.upscale(x, "4x-small", scale=4).shape == (1, 3, 32, 32)  # the others still work
    assert {i.name: i.scale for i in ups.items()}["bad"] is None  # listed, as A1111 lists its files
    uf.write(bad, _small_esrgan())  # fixed on disk: used at once, no restart
    assert ups.upscale(x, "bad", scale=4).shape == (1, 3, 32, 32)


def test_noncommercial_opt_in_says_it_is_not_implemented(folder: Path) -> None:
    _srformer(folder / "srformer.safetensors")
    ups = Upscalers(folder, UpscalerConfig(allow_noncommercial=True))
    with pytest.raises(UpscalerLoadError, match="SRFormer .non-commercial, allowed. is not implemented"):
        ups.upscale(torch.rand(1, 3, 8, 8), "srformer", scale=2)


def test_wrapped_and_prefixed_state_dicts(tmp_path: Path) -> None:
    """basicsr's params_ema / params, DataParallel's "module." prefix: unwrapped as spandrel does."""
    state = uf.compact(num_conv=2, nf=8)
    torch.save({"params": {f"module.{k}": v for k, v in state.items()}}, str(tmp_path / "a.pth"))
    uf.write(tmp_path / "b.pth", state, "params_ema")
    ups = Upscalers(tmp_path)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(ups.upscale(x, "a", scale=4), ups.upscale(x, "b", scale=4))


def test_a1111_pass_rule(folder: Path) -> None:
    """Upscaler.upscale: 2x with a 4x model = one model pass, then Lanczos to int(W*2 // 8 * 8); 6x = two
    passes (16x) down to 6x; size=(h, w) (hires): the passes, then Lanczos to exactly (h, w)."""
    ups = Upscalers(folder)
    x = torch.rand(1, 3, 20, 30)
    once = ups.upscale(x, "4x-small", scale=4)
    assert torch.allclose(
        ups.upscale(x, "4x-small", scale=2), pil_resize(once, (40, 56), LANCZOS).clamp(0, 1)
    )
    twice = ups.upscale(once, "4x-small", scale=4)
    assert torch.allclose(
        ups.upscale(x, "4x-small", scale=6), pil_resize(twice, (120, 176), LANCZOS).clamp(0, 1)
    )
    hires = ups.upscale(x, "4x-small", size=(50, 75))  # 2.5x: one pass to 80x120 (//8), then to 50x75
    assert torch.allclose(hires, pil_resize(pil_resize(once, (48, 72), LANCZOS), (50, 75)).clamp(0, 1))
    assert ups.upscale(x, "Nearest", scale=2).shape == (1, 3, 40, 56)
    assert ups.upscale(x, "None", size=(33, 44)).shape == (1, 3, 33, 44)


def test_sizes_over_the_limit_are_refused_before_running(folder: Path) -> None:
    ups = Upscalers(folder, UpscalerConfig(max_pixels=100 * 100))
    x = torch.rand(1, 3, 20, 20)
    with pytest.raises(Exception, match="200x200 is 40000 pixels; at most 10000"):
        ups.upscale(x, "Lanczos", scale=10)
    # 4.5x of 20 px = 88 px fits, but the 4x model's second pass (320 px) does not
    with pytest.raises(Exception, match="an intermediate pass size 320x320"):
        ups.upscale(x, "4x-small", scale=4.5)
    assert ups.stats("4x-small") is None or ups.stats("4x-small").windows == 0  # type: ignore[union-attr]


def test_tiles_of_concurrent_requests_share_model_calls(folder: Path) -> None:
    """A model call (another window shape) holds the batching thread until both requests have queued
    all their tiles (9 each); the next call then takes 12 of the 18 in queue order, so tiles of both.
    Request 0's pixels are below 0.5 and request 1's above, so each row of a call says whose it is."""
    ups = Upscalers(folder, UpscalerConfig(tile=8, overlap=4, batch=12))
    x = [torch.rand(1, 3, 24, 24) * 0.4, 0.6 + torch.rand(1, 3, 24, 24) * 0.4]
    want = [ups.upscale(x[i], "4x-small", scale=4) for i in range(2)]  # also loads it
    entry = ups._loaded["4x-small"]
    gate, calls, submitted = threading.Event(), [], []
    forward, submit = entry.net.forward, entry.batcher.submit

    def held(t: torch.Tensor) -> torch.Tensor:
        calls.append({int(row.mean() > 0.5) for row in t})
        gate.wait(30)
        return forward(t)

    def counted(t: torch.Tensor):  # type: ignore[no-untyped-def]
        submitted.append(1)
        return submit(t)

    entry.net.forward = held  # type: ignore[method-assign]
    entry.batcher.submit = counted  # type: ignore[method-assign]
    out: list[torch.Tensor] = [torch.empty(0)] * 2
    blocker = submit(torch.full((1, 3, 5, 5), 0.5))
    while not calls:
        time.sleep(0.01)

    def request(i: int) -> None:
        out[i] = ups.upscale(x[i], "4x-small", scale=4)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(submitted) < 18 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(60)
    assert blocker.result().shape == (1, 3, 20, 20)
    assert len(submitted) == 18 and len(calls) == 1 + 2, calls  # the blocker, then 12 + 6 tiles
    assert calls[1] == {0, 1}, calls  # tiles of both requests in one call
    for i in range(2):
        assert (out[i] - want[i]).abs().max() < 1e-5
