"""Flux ControlNet (diffusers' FluxControlNetModel: InstantX-, union- and XLabs-style) on a tiny random
Flux-dev and tiny ControlNets saved in the diffusers layout (tests/support/flux_controlnet_tiny.py):

- over HTTP against diffusers' FluxControlNetPipeline (same seed noise, its own sigmas and shift,
  the control image VAE-encoded and packed by the pipeline) within 2/255, one unit, a union unit with
  its control mode, an XLabs-style unit, and two units as FluxMultiControlNetModel sums them;
- rows mixing none / A / B / A+B / union / XLabs, each with its own guidance window, in one
  transformer call equal each row alone within 1e-5 (one ControlNet call per ControlNet);
- a Flux ControlNet named for an SD model, an SD ControlNet for the Flux model, and the unit fields
  Flux does not take -> 422 naming them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.controlnet import UNIT, ControlSet  # noqa: E402
from service.models.controlnet.flux_units import LATENT, t_scale  # noqa: E402
from service.models.flow_nets import pack  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.sampling.noise import NoiseSource  # noqa: E402
from service.serving.request import ControlNetRef, GenerationRequest  # noqa: E402
from tests.models.test_controlnet_diffusers import control_png, png_image  # noqa: E402
from tests.support.app_client import app_client
from tests.support.flow_tiny import T5_LEN  # noqa: E402
from tests.support.flux_controlnet_tiny import SIZE, flux_controlnet_store  # noqa: E402

STEPS, SEED, PROMPT, GUIDANCE = 4, 11, "a red cat", 3.5


@pytest.fixture(scope="module")
def root() -> tuple[Path, dict[str, Any]]:
    return flux_controlnet_store()


@pytest.fixture(scope="module")
def client(root: tuple[Path, dict[str, Any]]) -> Iterator[TestClient]:
    with app_client(root[0], batch_wait_ms=0) as c:
        yield c


@pytest.fixture(scope="module")
def flux(root: tuple[Path, dict[str, Any]]) -> Any:
    return ModelStore(root[0]).load("fluxcn").text_model  # type: ignore[attr-defined]


def _post(client: TestClient, **body: Any) -> Any:
    return client.post(
        "/sample", json={"model": "fluxcn", "prompt": PROMPT, "steps": STEPS, "seed": SEED, **body}
    )


def _pixels(out: Any) -> np.ndarray:
    assert out.status_code == 200, out.text
    return np.asarray(png_image(out.json()["images"][0]), dtype=np.int16)


def _pipeline(flux: Any, root: Path, controlnet: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

    c = flux.components
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(root / "fluxcn" / "scheduler")),
        vae=c.vae,
        text_encoder=c.text_encoders["text_encoder"],
        tokenizer=c.tokenizers["tokenizer"],
        text_encoder_2=c.text_encoders["text_encoder_2"],
        tokenizer_2=c.tokenizers["tokenizer_2"],
        transformer=c.transformer,
        controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (our units, the pipeline's ControlNet(s) by name, its keyword arguments)
CASES = {
    "instantx": (
        [{"model": "fcn_a", "image": 1, "weight": 0.8, "guidance_start": 0.5}],
        "fcn_a",
        {"controlnet_conditioning_scale": 0.8, "control_guidance_start": 0.5},
    ),
    "union": (
        [{"model": "fcn_union", "image": 2, "weight": 0.9, "control_type": "depth"}],
        "fcn_union",
        {"controlnet_conditioning_scale": 0.9, "control_mode": 2},
    ),
    "xlabs": (
        [{"model": "fcn_xlabs", "image": 3, "weight": 0.7}],
        "fcn_xlabs",
        {"controlnet_conditioning_scale": 0.7},
    ),
    "multi_union": (
        [
            {"model": "fcn_union", "image": 4, "weight": 0.6, "control_type": "canny"},
            {"model": "fcn_union", "image": 5, "weight": 0.9, "control_type": 4},
        ],
        ["fcn_union"],
        # windows per image: with one union net diffusers' pipeline otherwise keeps one scale (one image)
        {
            "controlnet_conditioning_scale": [0.6, 0.9],
            "control_mode": [0, 4],
            "control_guidance_start": [0.0, 0.0],
            "control_guidance_end": [1.0, 1.0],
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_http_matches_diffusers_flux_controlnet_pipeline(
    client: TestClient, root: tuple[Path, dict[str, Any]], flux: Any, case: str
) -> None:
    from diffusers import FluxMultiControlNetModel

    units, names, kwargs = CASES[case]
    units = [{**u, "image": control_png(int(u["image"]))} for u in units]
    nets = root[1]
    controlnet = (
        FluxMultiControlNetModel([nets[n] for n in names]) if isinstance(names, list) else nets[names]
    )
    images = [png_image(u["image"]) for u in units]
    noise = NoiseSource([SEED]).randn((4, SIZE // 8, SIZE // 8))
    with torch.inference_mode():
        ref = _pipeline(flux, root[0], controlnet)(
            PROMPT,
            control_image=images if isinstance(names, list) else images[0],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=pack(noise),
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            max_sequence_length=T5_LEN,
            **kwargs,
        ).images[0]
    want = np.round(ref * 255).astype(np.int16)
    ours = _pixels(_post(client, sampler="euler", schedule="flow", guidance=GUIDANCE, controlnets=units))
    assert np.abs(ours - want).max() <= 2, float(np.abs(ours - want).max())
    if case == "instantx":  # the unit changed the image (far past the tolerance)
        plain = _pixels(_post(client, sampler="euler", schedule="flow", guidance=GUIDANCE))
        assert np.abs(plain - want).max() > 20


def _cond(flux: Any, units: list[ControlNetRef]) -> dict[str, torch.Tensor]:
    fields = GenerationRequest(controlnets=units)
    inputs = flux.job_inputs(PROMPT, n=1, width=SIZE, height=SIZE, guidance=GUIDANCE, fields=fields)
    return inputs.cond  # type: ignore[no-any-return]


def test_mixed_rows_share_a_call_and_equal_each_alone(flux: Any) -> None:
    """none / A / B / A+B / union pose / XLabs / union depth rows, each with its own guidance window
    bound to the same 4-step schedule, in one transformer call at different times: each row as alone
    (1e-5), one call per ControlNet (the union one with both modes), a row without a unit is the
    plain transformer's."""
    rows_units = [
        [],
        [ControlNetRef("fcn_a", control_png(1))],
        [ControlNetRef("fcn_b", control_png(2), weight=0.6, guidance_end=0.5)],
        [
            ControlNetRef("fcn_a", control_png(3), weight=1.2),
            ControlNetRef("fcn_b", control_png(4), weight=0.5),
        ],
        [ControlNetRef("fcn_union", control_png(5), control_type="pose", guidance_start=0.25)],
        [ControlNetRef("fcn_xlabs", control_png(6), weight=0.7, guidance_start=0.5)],
        [ControlNetRef("fcn_union", control_png(5), control_type="depth")],  # row 4's image, another mode
    ]
    rows = [_cond(flux, u) for u in rows_units]
    assert all(set(r) == set(rows[0]) and LATENT in r for r in rows)  # every row carries the keys
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.3, 0.0])
    for r in rows:
        ControlSet.bind_schedule(r, sigmas, t_scale)
    n = len(rows)
    x = torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    x[6] = x[4]  # rows 4 and 6: same latents, time and image, another union mode
    # row 2 at step 3 (3/4 > its end 0.5: past its window), rows 4 and 5 at steps 2 and 3 (in theirs)
    t = torch.tensor([1.0, 0.8, 0.3, 0.8, 0.6, 0.3, 0.6])
    calls: list[int] = []
    for net in flux.controls.nets:
        net.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with torch.inference_mode():
        cond = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        together = flux.denoiser(x, t, **cond)
        assert sorted(calls) == [1, 1, 2, 2]  # fcn_a: rows 1, 3; fcn_b: row 3; union: 4, 6; xlabs: 5
        alone = torch.cat(
            [
                flux.denoiser(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in cond.items()})
                for i in range(n)
            ]
        )
        plain = {k: v for k, v in cond.items() if k not in (LATENT, UNIT)}
        bare = flux.denoiser(x, t, **plain)
        first = flux.denoiser(x[:1], t[:1], **{k: v[:1] for k, v in plain.items()})
    assert float((together - alone).abs().max()) <= 1e-5
    assert torch.equal(alone[:1], first)  # a row without a unit is the plain transformer's
    moved = (alone - bare).flatten(1).abs().amax(1)
    assert float(moved[0]) <= 1e-6 and float(moved[2]) <= 1e-6  # no unit; fcn_b past its window
    assert all(float(moved[i]) > 1e-3 for i in (1, 3, 4, 5, 6))
    assert float((alone[4] - alone[6]).abs().max()) > 1e-3  # same image, the mode token differs


def test_flux_controlnet_for_an_sd_model_and_sd_controlnet_for_flux_are_422(client: TestClient) -> None:
    image = control_png(1)
    r = client.post(
        "/sample",
        json={
            "model": "sd1",
            "prompt": PROMPT,
            "steps": 2,
            "controlnets": [{"model": "fcn_a", "image": image}],
        },
    )
    assert r.status_code == 422, r.text
    assert "fcn_a" in r.text and "Flux" in r.text and "controlnets[0].model" in r.text
    r = _post(client, steps=2, controlnets=[{"model": "cn_sd", "image": image}])
    assert r.status_code == 422, r.text
    assert (
        "cn_sd" in r.text and "is for SD" in r.text and "Flux" in r.text and "controlnets[0].model" in r.text
    )


@pytest.mark.parametrize(
    ("unit", "field", "words"),
    [
        ({"model": "fcn_union"}, "control_type", "canny"),
        ({"model": "fcn_union", "control_type": "sketch"}, "control_type", "lq"),
        ({"model": "fcn_union", "control_type": "Unknown"}, "control_type", "pose"),
        ({"model": "fcn_a", "control_mode": "ControlNet is more important"}, "control_mode", "Balanced"),
        ({"model": "nope"}, "model", "fcn_xlabs"),
    ],
)
def test_bad_flux_units_are_422_naming_the_field(
    client: TestClient, unit: dict[str, Any], field: str, words: str
) -> None:
    r = _post(client, steps=2, controlnets=[{"image": control_png(1), **unit}])
    assert r.status_code == 422, r.text
    assert f"controlnets[0].{field}" in r.text and words in r.text, r.text


def test_step_cache_with_flux_units_is_422(client: TestClient) -> None:
    r = _post(
        client,
        steps=2,
        cache={"method": "fbcache"},
        controlnets=[{"model": "fcn_a", "image": control_png(1)}],
    )
    assert r.status_code == 422 and "cache" in r.text, r.text


def _txt2img(client: TestClient, **body: Any) -> Any:
    """A1111's txt2img on the Flux model (Euler, cfg 1, the test size) with ``body``."""
    common = {"prompt": PROMPT, "sampler_name": "Euler", "cfg_scale": 1, "width": SIZE, "height": SIZE}
    settings = {"sd_model_checkpoint": "fluxcn"}
    return client.post("/sdapi/v1/txt2img", json={**common, "override_settings": settings, **body})


def test_a1111_alwayson_unit_on_flux_is_our_unit(client: TestClient) -> None:
    """sd-webui-controlnet's unit (as Forge sends it for Flux) through /sdapi/v1/txt2img equals
    /sample with the same unit."""
    image = control_png(7)
    unit = {
        "enabled": True,
        "module": "none",
        "model": "fcn_a [0123abcd]",
        "weight": 0.8,
        "image": image,
        "resize_mode": "Just Resize",
        "guidance_start": 0.25,
        "guidance_end": 1.0,
        "control_mode": "Balanced",
        "processor_res": -1,
    }
    r = _txt2img(client, steps=STEPS, seed=SEED, alwayson_scripts={"ControlNet": {"args": [unit]}})
    assert r.status_code == 200, r.text
    a1111 = np.asarray(png_image(r.json()["images"][0]), dtype=np.int16)
    ours_unit = {"model": "fcn_a", "image": image, "weight": 0.8, "guidance_start": 0.25, "resize_mode": 0}
    ours = _pixels(_post(client, sampler="euler", controlnets=[ours_unit]))
    assert np.abs(a1111 - ours).max() <= 1


def test_step_cache_rows_and_controlnet_rows_in_one_call_equal_each_alone(flux: Any) -> None:
    """A call with First-Block-Cache rows (no unit) and ControlNet rows (no cache): the cached rows
    run the cached forward, the others the plain one with their residuals; over two steps (the
    first fills the cache, the second reuses it) each row equals its own run alone within 1e-5."""
    from service.models.stepcache import STORE, CacheSpec, cache_rows

    spec = CacheSpec("fbcache", threshold=10.0)  # the cache always holds after the first evaluation
    units = [[], [ControlNetRef("fcn_a", control_png(1))], [], [ControlNetRef("fcn_b", control_png(2))]]
    rows = [_cond(flux, u) for u in units]
    caches = [spec, None, spec, None]
    alone_cache = [cache_rows(s, 1) for s in caches]
    parts = [cache_rows(s, 1) for s in caches]  # held: a row's cache is forgotten with its tensor
    together_cache = torch.cat(parts)
    cond = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    x = torch.randn(4, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    STORE.fixed_shape = False
    reused = STORE.reused
    with torch.inference_mode():
        for tv in (0.9, 0.7):
            t = torch.full([4], tv)
            together = flux.denoiser(x, t, **cond, cache=together_cache)
            alone = torch.cat(
                [
                    flux.denoiser(x[i : i + 1], t[:1], **{k: v[i : i + 1] for k, v in cond.items()}, cache=c)
                    for i, c in enumerate(alone_cache)
                ]
            )
            assert float((together - alone).abs().max()) <= 1e-5, tv
            plain = flux.denoiser(x, t, **{k: v for k, v in cond.items() if k not in (LATENT, UNIT)})
            assert float((together[1::2] - plain[1::2]).abs().max()) > 1e-3  # the units acted
    assert STORE.reused - reused == 4  # both cached rows reused on the second step, together and alone


def test_concurrent_requests_with_different_flux_units_share_calls(root: tuple[Path, dict[str, Any]]) -> None:
    """Over HTTP: requests with none / A / B / A+B (A's window ending half way) sent together run in
    fewer transformer calls than their steps added up (/metrics), each image equal to its solo run."""
    from concurrent.futures import ThreadPoolExecutor

    from service.api.app import create_app
    from service.api.settings import Settings

    unit_a = {"model": "fcn_a", "image": control_png(1)}
    unit_b = {"model": "fcn_union", "image": control_png(2), "weight": 0.7, "control_type": "tile"}
    units: list[list[dict[str, Any]]] = [[], [unit_a], [unit_b], [{**unit_a, "guidance_end": 0.5}, unit_b]]
    settings = Settings(model_store=root[0], torch_threads=1, batch_wait_ms=300, models=["fluxcn"])
    with TestClient(create_app(settings)) as c:

        def post(u: list[dict[str, Any]]) -> np.ndarray:
            return _pixels(_post(c, sampler="euler", controlnets=u))

        def rows() -> tuple[float, ...]:
            text = c.get("/metrics").text
            found = [
                re.search(k + r'\{model="fluxcn"\} (\S+)', text)
                for k in ("kdiff_batch_rows_sum", "kdiff_batch_rows_count")
            ]
            return tuple(float(m.group(1)) for m in found if m is not None)

        solo = [post(u) for u in units]
        before = rows()
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(post, units))
        after = rows()
    n_rows, calls = after[0] - before[0], after[1] - before[1]
    assert n_rows == 4 * STEPS and calls < 4 * STEPS, f"{n_rows} rows in {calls} calls: no sharing"
    for s, t in zip(solo, together, strict=True):
        assert np.abs(s - t).max() <= 1
    assert np.abs(solo[0] - solo[1]).max() > 2  # the unit acts


@pytest.mark.parametrize(
    ("folder", "single", "extra"),
    [("fcn_union", "fcn_union_file", {"control_type": "blur"}), ("fcn_xlabs", "fcn_xlabs_file", {})],
)
def test_single_files_are_their_folders(
    client: TestClient, folder: str, single: str, extra: dict[str, Any]
) -> None:
    """A diffusers-named single file and XLabs' original single-file layout (config read off the
    tensors) give the image of the same network's diffusers folder."""
    from service.models.controlnet.flux_single import keys_of

    keys = keys_of(flux_controlnet_store()[0] / "controlnet" / f"{single}.safetensors")
    if folder == "fcn_xlabs":  # x-flux's names, as ComfyUI's XLabs loader reads them
        assert {
            "pos_embed_input.weight",
            "input_hint_block.14.weight",
            "double_blocks.1.img_attn.qkv.weight",
        } <= set(keys)
    unit = {"image": control_png(8), "weight": 0.9, **extra}
    a = _pixels(_post(client, sampler="euler", controlnets=[{**unit, "model": folder}]))
    b = _pixels(_post(client, sampler="euler", controlnets=[{**unit, "model": single}]))
    assert np.array_equal(a, b)
    r = client.post(
        "/sample",
        json={"model": "sd1", "prompt": PROMPT, "steps": 2, "controlnets": [{**unit, "model": single}]},
    )
    assert r.status_code == 422 and "is for Flux" in r.text, r.text


def test_hires_fix_second_pass_keeps_the_flux_unit(client: TestClient) -> None:
    """A1111's hires fix on Flux with a unit: the second pass builds its control tokens at the hires
    size (twice the tokens) and the unit changes the result."""
    hires = {"steps": 3, "seed": 2, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent"}
    unit = {"model": "fcn_a", "image": control_png(7), "guidance_end": 0.5}
    units = {"alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    runs = [_txt2img(client, **hires, denoising_strength=0.6, **extra) for extra in (units, {})]
    a, b = (_pixels(r) for r in runs)
    assert a.shape == (2 * SIZE, 2 * SIZE, 3) and np.abs(a - b).max() > 2


def test_mask_is_each_tokens_share_of_the_effective_region(flux: Any) -> None:
    """A1111's unit mask (white = controlled) scales each token's residuals by the share of its
    pixels inside: a left-half mask leaves the right half's tokens without residuals and the left
    half's as the unmasked unit's."""
    import base64
    import io

    from PIL import Image

    from service.models.controlnet.flux_units import REGION

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    image = control_png(1)
    masked, whole = (_cond(flux, [ControlNetRef("fcn_a", image, mask=m)]) for m in (png, None))
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(2))
    side = SIZE // 16  # tokens a side
    with torch.inference_mode():
        kw = flux.velocity.inputs(
            x, torch.tensor([0.7]), masked["context"], masked["pooled"], guidance=masked["guidance"]
        )
        a, b = (flux.controls.residuals(kw, c[LATENT], c[UNIT], c[REGION]) for c in (masked, whole))
    for ra, rb in zip([*a[0], *a[1]], [*b[0], *b[1]], strict=True):
        ga, gb = ra.view(side, side, -1), rb.view(side, side, -1)
        assert float(ga[:, side // 2 :].abs().max()) == 0 and float(gb[:, side // 2 :].abs().max()) > 0
        assert torch.equal(ga[:, : side // 2], gb[:, : side // 2])
