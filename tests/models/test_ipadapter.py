"""IP-Adapter in process on tiny random files in h94's published layouts (tests/support/ipadapter_tiny):

- our projections (plain, plus Resampler) equal diffusers' ImageProjection / IPAdapterPlusImageProjection
  converted from the same file by diffusers' own loader, and our CLIP pixels equal CLIPImageProcessor's;
- one UNet call mixing none / adapter A / ControlNet / adapter A + ControlNet / adapter B (another
  image, weight, token count) equals each row run alone within 1e-5; a row without an adapter is the
  plain UNet's, bit for bit;
- bad input: unknown adapter (lists those available), an adapter of another base model, too many.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from PIL import Image  # noqa: E402

from service.models.controlnet import HINT  # noqa: E402
from service.models.ipadapter import TOKENS, UNIT, files  # noqa: E402
from service.models.ipadapter.encoder import clip_pixels  # noqa: E402
from service.models.ipadapter.projection import build  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.sampling.errors import InputError  # noqa: E402
from service.serving.request import ControlNetRef, GenerationRequest, IPAdapterRef  # noqa: E402
from tests.support.ipadapter_tiny import ip_store  # noqa: E402

CFG = 5.0


def png(seed: int, size: tuple[int, int] = (40, 56)) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def store() -> tuple[Path, dict[str, Path]]:
    return ip_store()


@pytest.fixture(scope="module")
def sd1(store: tuple[Path, dict[str, Path]]) -> Any:
    return ModelStore(store[0]).load("sd1").text_model  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-plus_sdxl_vit-h"])
def test_projection_matches_diffusers(store: tuple[Path, dict[str, Path]], sd1: Any, name: str) -> None:
    """diffusers' loader converts the file's image_proj names (strict) into its module; ours reads them as
    they are. Same tokens for the same embedding."""
    w = files.read(files.scan(store[0])[name])
    ref = sd1.unet._convert_ip_adapter_image_proj_to_diffusers(w.image_proj, low_cpu_mem_usage=False)
    ours = build(w.kind, w.image_proj)
    g = torch.Generator().manual_seed(1)
    x = (
        torch.randn(2, w.embed_dim, generator=g)
        if w.kind == "plain"
        else torch.randn(2, 17, w.embed_dim, generator=g)
    )
    with torch.no_grad():
        assert float((ours(x) - ref(x)).abs().max()) <= 1e-5


def test_clip_pixels_match_clip_image_processor() -> None:
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size=32, crop_size=32)  # what diffusers' load_ip_adapter makes
    for i, size in enumerate([(40, 56), (97, 31), (32, 32), (500, 300)]):
        img = Image.open(io.BytesIO(base64.b64decode(png(i, size))))
        want = proc(img, return_tensors="pt").pixel_values
        assert float((clip_pixels(img, 32) - want).abs().max()) <= 1e-5


def _rows(sd: Any, ips: list[IPAdapterRef], cns: list[ControlNetRef] | None = None) -> Any:
    fields = GenerationRequest(ip_adapters=ips, controlnets=cns)
    return sd.job_inputs("a red cat", "the dog", n=1, cfg_scale=CFG, width=64, height=64, fields=fields)


def test_mixed_rows_share_a_call_and_equal_each_alone(sd1: Any) -> None:
    """none / A / ControlNet / A + ControlNet / B + A (cond rows) and A, B + A (uncond rows, the
    unconditional image's tokens) in one UNet call: each row as alone (1e-5); a row without an adapter
    is the plain UNet's. Rows 0-3 share x and sigma, so they differ only by their units."""
    a, b = IPAdapterRef("ip-adapter_sd15", png(1), 0.8), IPAdapterRef("ip-adapter-plus_sd15", png(2), 0.6)
    cn = [ControlNetRef("cn_a", png(3, (64, 64)))]
    inputs = [_rows(sd1, []), _rows(sd1, [a]), _rows(sd1, [], cn), _rows(sd1, [a], cn), _rows(sd1, [b, a])]
    rows = [r.cond for r in inputs] + [inputs[1].uncond, inputs[4].uncond]
    assert all(set(r) == set(rows[0]) and {TOKENS, UNIT, HINT} <= set(r) for r in rows)
    n = len(rows)
    g = torch.Generator().manual_seed(3)
    x = torch.cat(
        [torch.randn(1, 4, 8, 8, generator=g).expand(4, -1, -1, -1), torch.randn(n - 4, 4, 8, 8, generator=g)]
    )
    sigma = torch.tensor([4.0] * 4 + torch.linspace(9.0, 0.5, n - 4).tolist())
    with torch.inference_mode():
        cond = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        together = sd1.denoiser(x, sigma, **cond)
        alone = torch.cat(
            [
                sd1.denoiser(x[i : i + 1], sigma[i : i + 1], **{k: v[i : i + 1] for k, v in cond.items()})
                for i in range(n)
            ]
        )
        bare = sd1.denoiser(x[:1], sigma[:1], context=cond["context"][:1])
    assert float((together - alone).abs().max()) <= 1e-5
    assert torch.equal(alone[:1], bare)  # a row without anything is the plain UNet's
    assert float((alone[3] - alone[2]).abs().max()) > 1e-3  # the adapter acts on a ControlNet row
    assert float((alone[1] - alone[0]).abs().max()) > 1e-3
    assert float((alone[5] - alone[1]).abs().max()) > 1e-3  # uncond tokens are not the image's
    assert int(cond[UNIT][4, 0, 0]) != int(cond[UNIT][4, 1, 0])  # two adapters in one row


def test_guidance_window_is_the_extensions_rule(sd1: Any) -> None:
    """guidance_start 0.2, guidance_end 0.5 over 10 steps: the adapter acts at steps 2..5 (A1111's
    rule for every unit, IP-Adapter ones included) and the row is the plain one elsewhere."""
    ref = IPAdapterRef("ip-adapter_sd15", png(1), 1.0, guidance_start=0.2, guidance_end=0.5)
    rows = _rows(sd1, [ref]).cond
    sigmas = torch.cat([torch.linspace(14.0, 0.1, 10), torch.zeros(1)])
    sd1.images.bind_schedule(rows, sigmas, sd1.denoiser.sigma_to_t)
    lo, hi = float(rows[UNIT][0, 0, 5]), float(rows[UNIT][0, 0, 6])
    ts = sd1.denoiser.sigma_to_t(sigmas[:-1]).tolist()
    assert [i for i, tv in enumerate(ts) if lo < tv <= hi] == [2, 3, 4, 5]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    plain = {k: v for k, v in rows.items() if k not in (TOKENS, UNIT)}
    with torch.inference_mode():
        for step, acts in ((0, False), (3, True), (8, False)):
            s = sigmas[step : step + 1]
            assert torch.equal(sd1.denoiser(x, s, **rows), sd1.denoiser(x, s, **plain)) != acts, step


def test_same_image_encodes_once(sd1: Any) -> None:
    """A reference image sent again (a character's face on every request) reuses its tokens."""
    ref = IPAdapterRef("ip-adapter-plus_sd15", png(11), 0.5)
    first = _rows(sd1, [ref]).cond[TOKENS]
    encoder = sd1.images.adapters[sd1.images.resolve(ref.model, "x")].encoder
    calls: list[int] = []
    hook = encoder.net.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        again = _rows(sd1, [ref]).cond[TOKENS]
        other = _rows(sd1, [IPAdapterRef(ref.model, png(12), 0.5)]).cond[TOKENS]
    finally:
        hook.remove()
    assert torch.equal(first, again) and not torch.equal(first, other) and len(calls) == 1


def test_adapters_load_within_the_memory_budget(store: tuple[Path, dict[str, Path]], sd1: Any) -> None:
    """Each adapter (and a new encoder) reserves its files' bytes before loading, then what it holds;
    a refusal (the pool's 507) passes through and loads nothing."""
    from service.models.ipadapter import ImageAdapters

    class Refused(Exception):
        pass

    booked: list[int] = []
    images = ImageAdapters(store[0], sd1.unet, sd1.device, sd1.dtype, "sd1", reserve=booked.append)
    images.resolve("ip-adapter_sd15", "ip_adapters[0]")
    encoder = store[1]["ip-adapter_sd15"].parent / "image_encoder" / "model.safetensors"
    assert booked[0] == store[1]["ip-adapter_sd15"].stat().st_size + encoder.stat().st_size
    images.resolve("ip-adapter-plus_sd15", "ip_adapters[0]")  # same encoder: only the adapter file
    assert booked[2] == store[1]["ip-adapter-plus_sd15"].stat().st_size
    assert sum(booked) == images.held_bytes() > 0

    def refuse(nbytes: int) -> None:
        if nbytes > 0:
            raise Refused("over KDIFF_MEMORY_BUDGET")

    full = ImageAdapters(store[0], sd1.unet, sd1.device, sd1.dtype, "sd1", reserve=refuse)
    with pytest.raises(Refused):
        full.resolve("ip-adapter_sd15", "ip_adapters[0]")
    assert not full.adapters and full.held_bytes() == 0


def test_bad_adapters_are_named(store: tuple[Path, dict[str, Path]], sd1: Any) -> None:
    with pytest.raises(InputError) as unknown:
        _rows(sd1, [IPAdapterRef("nope", png(1))])
    assert unknown.value.field == "ip_adapters[0].model"
    assert set(unknown.value.allowed) == set(store[1])
    with pytest.raises(InputError) as other_base:
        _rows(sd1, [IPAdapterRef("ip-adapter_sdxl", png(1))])
    assert "ip-adapter_sdxl" in other_base.value.message and "'sd1'" in other_base.value.message
    with pytest.raises(InputError) as many:
        _rows(sd1, [IPAdapterRef("ip-adapter_sd15", png(1))] * 4)
    assert many.value.field == "ip_adapters"
    with pytest.raises(InputError) as no_image:
        _rows(sd1, [IPAdapterRef("ip-adapter_sd15")])
    assert no_image.value.field == "ip_adapters[0].image"


def test_unusable_files_are_422s_not_500s(sd1: Any, tmp_path: Path) -> None:
    """A .bin that pickles code, a cut-off .safetensors, a FaceID layout, an adapter without a fitting
    encoder: each an InputError naming the adapter and why (nothing runs, nothing crashes)."""
    import pickle

    from safetensors.torch import save_file

    from service.models.ipadapter import ImageAdapters
    from tests.support.ipadapter_tiny import plain_proj, save_adapter

    folder = tmp_path / "ipadapter"
    folder.mkdir()

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pickled code ran",))

    (folder / "evil.bin").write_bytes(pickle.dumps({"image_proj": Boom()}))
    save_file({"image_proj.proj.weight": torch.zeros(4, 4)}, str(folder / "cut.safetensors"))
    (folder / "cut.safetensors").write_bytes((folder / "cut.safetensors").read_bytes()[:-7])
    faceid = {
        "proj.0.weight": torch.zeros(8, 4),
        "proj.2.weight": torch.zeros(128, 8),
        "norm.weight": torch.ones(32),
    }
    save_adapter(folder / "faceid.safetensors", faceid, {"1.to_k_ip.weight": torch.zeros(16, 32)})
    g = torch.Generator().manual_seed(0)
    layers = {
        f"{2 * k + 1}.to_{kv}_ip.weight": torch.zeros(h, 32)
        for k, h in enumerate([16, 16, 16, 32])
        for kv in "kv"
    }
    save_adapter(folder / "no_encoder.safetensors", plain_proj(24, 32, g), layers)
    images = ImageAdapters(tmp_path, sd1.unet, sd1.device, sd1.dtype, "sd1")
    why = {"evil": "could not be read", "cut": "could not be read", "faceid": "plain and plus"}
    why["no_encoder"] = "needs a CLIP image encoder"
    for name, reason in why.items():
        with pytest.raises(InputError) as err:
            images.resolve(name, "ip_adapters[0]")
        assert err.value.field == "ip_adapters[0].model" and name in err.value.message, err.value.message
        assert reason in err.value.message and set(err.value.allowed) == set(why)
