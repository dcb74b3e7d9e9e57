"""ControlNet against diffusers on tiny random models saved in the real layouts.

- our network (diffusers folder and original ``control_model.*`` single file) gives diffusers'
  ControlNetModel's residuals; the original file's names convert back with diffusers' own converter;
- a whole generation with a unit equals StableDiffusionControlNetPipeline /
  StableDiffusionXLControlNetPipeline (same noise, Euler's sigmas, CFG) on the final latents;
- rows mixing none / A / B / A+B in one UNet call equal each row alone within 1e-5;
- control modes and guidance windows as sd-webui-controlnet documents them.
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

from diffusers import (  # noqa: E402
    EulerDiscreteScheduler,
)
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402
from PIL import Image  # noqa: E402

from service.models.controlnet import HINT, UNIT, files  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.models.text_generate import generate  # noqa: E402
from service.sampling.errors import InputError  # noqa: E402
from service.serving.request import ControlNetRef, GenerationRequest  # noqa: E402
from tests.support.controlnet_tiny import add_controlnets, residual_gap, to_original  # noqa: E402
from tests.support.sd_tiny import diffusers_pipeline, save_diffusers, write_manifest  # noqa: E402

STEPS, CFG = 5, 5.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("cn-store")
    for name, kw in (("sd1", {}), ("sdxl", {"sdxl": True})):
        save_diffusers(root / name, **kw)
        write_manifest(root / name)
    return root, add_controlnets(root)


def control_png(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def test_original_file_names_are_the_real_layout(store: tuple[Path, dict[str, Any]]) -> None:
    """diffusers' own single-file converter maps our original-layout names back to the network."""
    ref = store[1]["control_v11p_sd15_tiny"]
    sd = ref.state_dict()
    conv = convert_controlnet_checkpoint(to_original(sd, 1, 2), dict(ref.config))
    assert set(conv) == set(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", ["cn_a", "control_v11p_sd15_tiny", "cn_xl"])
def test_network_matches_controlnetmodel(store: tuple[Path, dict[str, Any]], name: str) -> None:
    root, nets = store
    ours = files.load(files.scan(root)[name], torch.device("cpu"), torch.float32)
    sdxl = name == "cn_xl"
    assert residual_gap(ours, nets[name], 80 if sdxl else 32, 48 if sdxl else None) <= 1e-5


@pytest.mark.parametrize(
    ("model", "cn"), [("sd1", "cn_a"), ("sd1", "control_v11p_sd15_tiny"), ("sdxl", "cn_xl")]
)
def test_generation_matches_diffusers_pipeline(
    store: tuple[Path, dict[str, Any]], model: str, cn: str
) -> None:
    root, nets = store
    sd = ModelStore(root).load(model).text_model  # type: ignore[attr-defined]
    c = sd.components
    scheduler = EulerDiscreteScheduler.from_config(c.scheduler_config)
    image = control_png(5)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = diffusers_pipeline(sd, scheduler, nets[cn])
    weight = 0.8
    with torch.inference_mode():
        ref = pipe(
            "a red cat",
            negative_prompt="the dog",
            image=png_image(image),
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            height=64,
            width=64,
            latents=noise.clone(),
            output_type="latent",
            controlnet_conditioning_scale=weight,
        ).images
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.clone()
    fields = GenerationRequest(controlnets=[ControlNetRef(cn, image, weight=weight)])

    def run(**extra: Any) -> torch.Tensor:  # our generation at the pipeline's noise and sigmas
        return generate(
            sd,
            "a red cat",
            "the dog",
            seeds=[0],
            sampler="euler",
            steps=STEPS,
            cfg_scale=CFG,
            width=64,
            height=64,
            sigmas=sigmas,
            x_start=noise * sigmas[0],
            output="latents",
            **extra,
        )

    ours, plain = run(fields=fields), run()
    err = float((ours - ref).abs().max())
    assert err <= 1e-4, f"max |ours - diffusers| = {err:.3g}"
    assert float((plain - ref).abs().max()) > 100 * max(err, 1e-6)  # the unit changed the image
    images_ours, images_ref = sd.decode(ours), sd.decode(ref)
    assert float((images_ours - images_ref).abs().max()) / 2 <= 2 / 255


def _rows(sd: Any, units: list[ControlNetRef], steps: int = STEPS) -> Any:
    fields = GenerationRequest(controlnets=units)
    return sd.job_inputs("a red cat", "the dog", n=1, cfg_scale=CFG, width=64, height=64, fields=fields)


def test_mixed_rows_share_a_call_and_equal_each_alone(store: tuple[Path, dict[str, Any]]) -> None:
    """none / A / B / A+B in one UNet call: each row as when it runs alone (within 1e-5), and one
    ControlNet call per ControlNet model."""
    root, _ = store
    sd = ModelStore(root).load("sd1").text_model  # type: ignore[attr-defined]
    units = [
        [],
        [ControlNetRef("cn_a", control_png(1))],
        [ControlNetRef("cn_b", control_png(2), weight=0.6, control_mode="My prompt is more important")],
        [
            ControlNetRef("cn_a", control_png(3), weight=1.2),
            ControlNetRef("cn_b", control_png(4), weight=0.5),
        ],
    ]
    rows = [_rows(sd, u).cond for u in units]
    assert all(set(r) == set(rows[0]) and HINT in r for r in rows)  # every row carries the keys
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([9.0, 3.0, 1.0, 0.5])
    calls: list[int] = []
    controls = sd.controls
    for net in controls.nets:  # the control image's embedding: once per ControlNet call
        net.controlnet_cond_embedding.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with torch.inference_mode():
        cond = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        together = sd.denoiser(x, sigma, **cond)
        assert sorted(calls) == [2, 2]  # cn_a on rows 1 and 3, cn_b on rows 2 and 3: one call each
        alone = torch.cat(
            [
                sd.denoiser(x[i : i + 1], sigma[i : i + 1], **{k: v[i : i + 1] for k, v in cond.items()})
                for i in range(4)
            ]
        )
        bare = sd.denoiser(x[:1], sigma[:1], context=cond["context"][:1])
    assert float((together - alone).abs().max()) <= 1e-5
    assert torch.equal(alone[:1], bare)  # a row without a unit is the plain UNet's


def test_control_modes_and_guidance_window(store: tuple[Path, dict[str, Any]]) -> None:
    """sd-webui-controlnet: "ControlNet is more important" leaves the uncond rows without the unit;
    "My prompt is more important" scales output i by 0.825 ** (12 - i); step i acts when
    start <= i / steps <= end."""
    root, _ = store
    sd = ModelStore(root).load("sd1").text_model  # type: ignore[attr-defined]
    img = control_png(1)
    balanced = _rows(sd, [ControlNetRef("cn_a", img)])
    control = _rows(sd, [ControlNetRef("cn_a", img, control_mode="ControlNet is more important")])
    prompt = _rows(sd, [ControlNetRef("cn_a", img, control_mode=1)])
    assert balanced.uncond[UNIT][0, 0, 0] == 0 and control.uncond[UNIT][0, 0, 0] == -1
    assert control.cond[UNIT][0, 0, 0] == 0 and prompt.cond[UNIT][0, 0, 4] == 1
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    ctx = balanced.cond["context"]
    with torch.inference_mode():
        raw = sd.controls.nets[0](x, t, ctx, balanced.cond[HINT][0, :1, :3].float() / 255)
        table = prompt.cond[UNIT]  # unbound: the whole schedule
        down, mid = sd.controls.staged(
            x, t, ctx, prompt.cond[HINT], table, {"y": None, "time_ids": None}
        ).full()
    for i, r in enumerate([*down, mid]):
        assert torch.allclose(r, raw[i] * 0.825 ** (12 - i), atol=1e-6)
    masked = prompt.cond[HINT].clone()
    masked[:, :, 3, :, :32] = 0  # effective region: the right half only
    with torch.inference_mode():
        down, mid = sd.controls.staged(x, t, ctx, masked, table, {"y": None, "time_ids": None}).full()
    assert float(down[0][..., :4].abs().max()) == 0 and float(down[0][..., 4:].abs().max()) > 0
    # guidance window over 10 steps, start 0.2, end 0.5: steps 2..5 act (the extension's rule)
    rows = _rows(sd, [ControlNetRef("cn_a", img, guidance_start=0.2, guidance_end=0.5)]).cond
    sigmas = torch.cat([torch.linspace(14.0, 0.1, 10), torch.zeros(1)])
    sd.controls.bind_schedule(rows, sigmas, sd.denoiser.sigma_to_t)
    sd.controls.bind_schedule(rows, sigmas, sd.denoiser.sigma_to_t)  # binding twice: the same window
    lo, hi = float(rows[UNIT][0, 0, 5]), float(rows[UNIT][0, 0, 6])
    ts = sd.denoiser.sigma_to_t(sigmas[:-1]).tolist()
    assert [i for i, tv in enumerate(ts) if lo < tv <= hi] == [2, 3, 4, 5]


def test_bad_units_are_named(store: tuple[Path, dict[str, Any]]) -> None:
    root, _ = store
    sd = ModelStore(root).load("sd1").text_model  # type: ignore[attr-defined]
    with pytest.raises(InputError) as unknown:
        _rows(sd, [ControlNetRef("nope", control_png(1))])
    assert unknown.value.field == "controlnets[0].model" and "cn_a" in unknown.value.allowed
    with pytest.raises(InputError) as other_base:
        _rows(sd, [ControlNetRef("cn_xl", control_png(1))])
    assert "SDXL" in other_base.value.message and "cn_xl" in other_base.value.message
    with pytest.raises(InputError) as module:
        _rows(sd, [ControlNetRef("cn_a", control_png(1), module="depth_midas")])
    assert module.value.field == "controlnets[0].module" and "canny" in module.value.allowed
    with pytest.raises(InputError) as mode:
        _rows(sd, [ControlNetRef("cn_a", control_png(1), control_mode="louder")])
    assert "Balanced" in mode.value.allowed


def test_bgr_controlnet_matches_controlnetmodel(tmp_path: Path) -> None:
    """A ControlNet trained on BGR control images (``controlnet_conditioning_channel_order: bgr``):
    its hint's channels flipped once, as diffusers' ControlNetModel does (the whole call runs the
    staged start / finish the step cache uses, where the flip is)."""
    from tests.support.controlnet_tiny import make_controlnet, save_folder

    ref = make_controlnet(seed=5, controlnet_conditioning_channel_order="bgr")
    save_folder(ref, tmp_path / "controlnet" / "cn_bgr")
    ours = files.load(files.scan(tmp_path)["cn_bgr"], torch.device("cpu"), torch.float32)
    assert ours.cfg.controlnet_conditioning_channel_order == "bgr"
    assert residual_gap(ours, ref, 32) <= 1e-5
