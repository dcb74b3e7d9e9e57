"""ControlNet-Union (SDXL) against diffusers on tiny random models in the real layout (a diffusers
folder, ``"_class_name": "ControlNetUnionModel"``; 6 types as controlnet-union-sdxl-1.0, 8 as ProMax):

- our network gives diffusers' ControlNetUnionModel's residuals (one image; several images with
  their types; the pipeline's CFG pair of identical rows);
- rows mixing none / a plain ControlNet / the union with type A / type B / two images in one UNet
  call equal each row alone within 1e-5, one union call for all its rows;
- a union ControlNet for an SD 1.x model and an unknown control type are 422s naming what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.controlnet import HINT, UNIT, files  # noqa: E402
from service.models.controlnet.union import TYPES, UnionControlNet  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.models.text_generate import generate  # noqa: E402
from service.sampling.errors import InputError  # noqa: E402
from service.serving.request import ControlNetRef, GenerationRequest, UnionImage  # noqa: E402
from tests.models.test_controlnet_diffusers import control_png, png_image  # noqa: E402
from tests.support.controlnet_tiny import make_controlnet, save_folder  # noqa: E402
from tests.support.union_tiny import make_union, union_gap, union_reference, union_store  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("union-store")
    save_folder(make_controlnet(sdxl=True, seed=4), root / "controlnet" / "cn_xl")
    return root, union_store(root)


@pytest.fixture(scope="module")
def sdxl(store: tuple[Path, dict[str, Any]]) -> Any:
    return ModelStore(store[0]).load("sdxl").text_model  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "modes", "batch"),
    [("union_xl", [3], 1), ("union_xl", [1, 5], 2), ("union_promax", [0, 6, 7], 1)],
)
def test_network_matches_controlnetunionmodel(
    store: tuple[Path, dict[str, Any]], name: str, modes: list[int], batch: int
) -> None:
    root, nets = store
    ours = files.load(files.scan(root)[name], torch.device("cpu"), torch.float32)
    assert isinstance(ours, UnionControlNet) and ours.types == nets[name].config.num_control_type
    assert union_gap(ours, nets[name], modes, batch=batch) <= 1e-5


def test_single_file_union_matches_controlnetunionmodel(tmp_path: Path) -> None:
    """xinsir's ProMax weights file alone (diffusers' names, no config: how ComfyUI and A1111 users
    keep ``diffusion_pytorch_model_promax.safetensors``), SDXL's proportions (64 channels a head,
    256-wide time ids): the config read off the tensors, residuals as diffusers' network's; the same
    weights in a folder whose config lacks the union sizes load as the union they are."""
    from safetensors.torch import save_file

    sdxl = {"addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 48 + 6 * 256}
    shape = {"block_out_channels": (64, 128), "attention_head_dim": (1, 2), "norm_num_groups": 32}
    trans = {"num_trans_channel": 64, "num_proj_channel": 64, "num_trans_head": 8}
    ref = make_union(seed=7, types=8, use_linear_projection=True, **sdxl, **shape, **trans)
    path = tmp_path / "controlnet" / "controlnet-union-sdxl-promax.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    # and a folder whose config names another class and leaves out the union sizes: the tensors decide
    ref.save_pretrained(str(tmp_path / "controlnet" / "promax_folder"), safe_serialization=True)
    cfg_path = tmp_path / "controlnet" / "promax_folder" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("num_")} | {"_class_name": "ControlNetModel"}
    cfg_path.write_text(json.dumps(raw))
    for name in ("controlnet-union-sdxl-promax", "promax_folder"):
        ours = files.load(files.scan(tmp_path)[name], torch.device("cpu"), torch.float32)
        assert isinstance(ours, UnionControlNet) and ours.types == 8
        assert union_gap(ours, ref, [3, 6]) <= 1e-5


def test_generation_latents_match_the_union_pipeline(sdxl: Any, store: tuple[Path, dict[str, Any]]) -> None:
    """The whole generation (ProMax, depth + segment images, weight 0.8) against
    StableDiffusionXLControlNetUnionPipeline on the final latents: same noise, Euler's sigmas, CFG."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(sdxl.components.scheduler_config)
    images, modes, weight = [control_png(5), control_png(6)], [1, 5], 0.8
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    control = {"control_image": [png_image(i) for i in images], "control_mode": modes}
    ref = union_reference(
        sdxl,
        store[1]["union_promax"],
        scheduler,
        noise,
        control | {"controlnet_conditioning_scale": weight},
        num_inference_steps=5,
        guidance_scale=5.0,
        output_type="latent",
    )
    sigmas = scheduler.sigmas.clone()
    unit = ControlNetRef(
        "union_promax", images[0], weight, control_type="depth", images=(UnionImage(images[1], "segment"),)
    )

    def run(**extra: Any) -> torch.Tensor:
        kw = {"sampler": "euler", "steps": 5, "cfg_scale": 5.0, "width": 64, "height": 64}
        return generate(  # type: ignore[no-any-return]
            sdxl,
            "a red cat",
            "the dog",
            seeds=[0],
            sigmas=sigmas,
            x_start=noise * sigmas[0],
            output="latents",
            **kw,
            **extra,
        )

    ours, plain = run(fields=GenerationRequest(controlnets=[unit])), run()
    err = float((ours - ref).abs().max())
    assert err <= 1e-4, f"max |ours - diffusers| = {err:.3g}"
    assert float((plain - ref).abs().max()) > 100 * max(err, 1e-6)  # the unit changed the latents


def _rows(sd: Any, units: list[ControlNetRef]) -> Any:
    fields = GenerationRequest(controlnets=units)
    return sd.job_inputs("a red cat", "the dog", n=1, cfg_scale=5.0, width=64, height=64, fields=fields)


def test_mixed_rows_share_a_call_and_equal_each_alone(sdxl: Any) -> None:
    """none / plain SDXL ControlNet / union canny / union depth (another weight, prompt mode) /
    union with two images (openpose + tile) in one UNet call: each row as alone within 1e-5, and
    one call of the union network for its three rows."""
    units = [
        [],
        [ControlNetRef("cn_xl", control_png(1))],
        [ControlNetRef("union_promax", control_png(2), control_type="canny")],
        [ControlNetRef("union_promax", control_png(3), weight=0.6, control_type="Depth", control_mode=1)],
        [
            ControlNetRef(
                "union_promax",
                control_png(4),
                weight=0.8,
                control_type="openpose",
                images=(UnionImage(control_png(5), "tile"),),
            )
        ],
    ]
    rows = [_rows(sdxl, u).cond for u in units]
    assert all(set(r) == set(rows[0]) and HINT in r for r in rows)
    assert rows[4][UNIT][0, :2, 7].tolist() == [0, 6] and rows[4][UNIT][0, :2, 8].tolist() == [0, 0]
    n = len(rows)
    x = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([9.0, 3.0, 1.0, 0.5, 2.0])
    calls: list[int] = []
    union = next(net for net in sdxl.controls.nets if isinstance(net, UnionControlNet))
    hook = union.control_add_embedding.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        with torch.inference_mode():
            cond = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
            together = sdxl.denoiser(x, sigma, **cond)
            assert calls == [3]  # one union call: rows 2, 3 and 4
            alone = torch.cat(
                [
                    sdxl.denoiser(
                        x[i : i + 1], sigma[i : i + 1], **{k: v[i : i + 1] for k, v in cond.items()}
                    )
                    for i in range(n)
                ]
            )
            plain = {k: v[:1] for k, v in cond.items() if k not in (HINT, UNIT)}
            bare = sdxl.denoiser(x[:1], sigma[:1], **plain)
    finally:
        hook.remove()
    assert float((together - alone).abs().max()) <= 1e-5
    assert torch.equal(alone[:1], bare)
    # the types matter: the same image as canny and as depth give different predictions
    swapped = _rows(sdxl, [ControlNetRef("union_promax", control_png(2), control_type="depth")]).cond
    with torch.inference_mode():
        other = sdxl.denoiser(x[2:3], sigma[2:3], **swapped)
    assert float((other - alone[2:3]).abs().max()) > 1e-3


def test_bad_union_units_are_named(sdxl: Any, store: tuple[Path, dict[str, Any]]) -> None:
    sd1 = ModelStore(store[0]).load("sd1").text_model  # type: ignore[attr-defined]
    with pytest.raises(InputError) as other_base:
        _rows(sd1, [ControlNetRef("union_xl", control_png(1), control_type="canny")])
    assert other_base.value.field == "controlnets[0].model"
    assert "union_xl" in other_base.value.message and "SDXL" in other_base.value.message
    with pytest.raises(InputError) as unknown:
        _rows(sdxl, [ControlNetRef("union_promax", control_png(1), control_type="fisheye")])
    assert unknown.value.field == "controlnets[0].control_type"
    assert unknown.value.allowed == ["auto", *TYPES] and "fisheye" in unknown.value.message
    with pytest.raises(InputError) as not_promax:  # tile: ProMax only
        _rows(sdxl, [ControlNetRef("union_xl", control_png(1), control_type="tile")])
    assert not_promax.value.allowed == ["auto", *TYPES[:6]]
    with pytest.raises(InputError) as second:
        _rows(sdxl, [ControlNetRef("union_xl", control_png(1), images=(UnionImage(control_png(2), 9),))])
    assert second.value.field == "controlnets[0].images[0].control_type"
    with pytest.raises(InputError) as untyped:  # with several images, each names its type
        _rows(
            sdxl,
            [ControlNetRef("union_xl", control_png(1), control_type=1, images=(UnionImage(control_png(2)),))],
        )
    assert untyped.value.field == "controlnets[0].images[0].control_type"
    with pytest.raises(InputError) as no_image:
        _rows(
            sdxl, [ControlNetRef("union_xl", control_png(1), control_type=1, images=(UnionImage(None, 3),))]
        )
    assert no_image.value.field == "controlnets[0].images[0].image"
    with pytest.raises(InputError) as plain:
        _rows(sdxl, [ControlNetRef("cn_xl", control_png(1), images=(UnionImage(control_png(2), 1),))])
    assert plain.value.field == "controlnets[0].images" and "union" in plain.value.message
    with pytest.raises(InputError) as too_many:
        extra = tuple(UnionImage(control_png(i), i) for i in range(3))
        _rows(sdxl, [ControlNetRef("union_promax", control_png(1), control_type=0, images=extra)])
    assert too_many.value.field == "controlnets"
