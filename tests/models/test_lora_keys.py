"""Layer names of real LoRA files onto our modules, checked against diffusers' own conversion.

- An SDXL-layout UNet (SDXL's block types: DownBlock2D first, two cross-attention levels, 2 layers per
  block, linear projections, text_time embedding; tiny channels): a kohya LoCon file with the SGM
  names kohya writes for SDXL (``lora_unet_input_blocks_4_1_...``, ``..._in_layers_2``, ``..._op``)
  maps every key to the layer diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` +
  ``_convert_non_diffusers_lora_to_diffusers`` maps it to, and the UNet's output equals diffusers'
  ``load_lora_into_unet`` + ``fuse_lora`` (<= 1e-4).
- CLIP text encoders: ``text_model_...`` names (files) and names without that level match both
  transformers 5's ``CLIPTextModel`` (no ``text_model`` level) and ``CLIPTextModelWithProjection``.
- SD1 under SGM names (some tools write those; diffusers reads them for SDXL only) equals the same
  LoRA under diffusers names.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")
pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (dev extra)")

from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import (  # noqa: E402
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)

from service.models.lora import LoraFormatError, RowLora, parse_state_dict  # noqa: E402
from service.models.lora.layers import Plan  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from tests.support.lora_files import kohya_file  # noqa: E402
from tests.support.sd_tiny import text_encoder, tiny_sd_store  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_unet() -> Any:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(8, 16, 32),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ).eval()


def _diffusers_names(state: dict[str, torch.Tensor], unet: Any) -> dict[str, str]:
    """kohya layer name -> the UNet module diffusers' converters map it to (tracked by tensor)."""
    by_tensor = {id(v): k.split(".")[0] for k, v in state.items() if k.endswith("lora_down.weight")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    out = {}
    for key, value in converted.items():
        if key.startswith("unet.") and id(value) in by_tensor:
            module = key.removeprefix("unet.").split(".lora")[0].split("_lora")[0]
            module = module.replace(".processor", "")
            module = module + ".0" if module.endswith(".to_out") else module  # to_out_lora: to_out.0
            out[by_tensor[id(value)]] = module.replace(".", "_")
    return out


def test_sgm_names_map_where_diffusers_maps_them(sdxl_unet: Any) -> None:
    state = kohya_file(sdxl_unet, [], 0, conv_rank=2, sgm=True)
    stems = {k.split(".")[0] for k in state}
    real = {  # names as they appear in SDXL LoRA files kohya wrote
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_8_0_skip_connection",
    }
    assert real <= stems
    theirs = _diffusers_names(state, sdxl_unet)
    assert len(theirs) == len(stems) > 100
    row = RowLora(sdxl_unet)
    try:
        ours = {stem: row.resolve(stem.removeprefix("lora_unet_")) for stem in stems}
    finally:
        row.remove()
    wrong = {k: (ours[k], theirs[k]) for k in stems if ours[k] != theirs[k]}
    assert not wrong, wrong


def test_sgm_locon_output_equals_diffusers_loader(sdxl_unet: Any) -> None:
    state = kohya_file(sdxl_unet, [], 3, conv_rank=2, conv_alpha=1.0, alpha=2.0, sgm=True)
    ref = copy.deepcopy(sdxl_unet)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=ref.config)
    StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=ref, adapter_name="x")
    ref.fuse_lora(lora_scale=0.7)
    layers, fmt = parse_state_dict(state, "sgm")
    assert fmt == "kohya"
    row = RowLora(sdxl_unet)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 30.0])
    ctx = torch.randn(2, 5, 16, generator=g)
    added = {
        "text_embeds": torch.randn(2, 16, generator=g),
        "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2),
    }
    try:
        prepared = row.prepare(layers["unet"], "sgm")
        plan = Plan([prepared], torch.full((1, prepared.rank), 0.7))
        with torch.inference_mode():
            with row.rows(plan, 0):
                ours = sdxl_unet(x, t, ctx, added_cond_kwargs=added).sample
            base = sdxl_unet(x, t, ctx, added_cond_kwargs=added).sample
            want = ref(x, t, ctx, added_cond_kwargs=added).sample
    finally:
        row.remove()
    assert (want - base).abs().max() > 1e-2, "the LoRA must change the output for the test to mean anything"
    assert (ours - want).abs().max() <= 1e-4


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("spelling", ["text_model_encoder_layers_1_mlp_fc2", "encoder_layers_1_mlp_fc2"])
def test_text_encoder_names_with_or_without_text_model(projection: bool, spelling: str) -> None:
    te = text_encoder(600, 32, projection, 0)
    has_level = any(n.startswith("text_model.") for n, _ in te.named_modules())
    assert has_level == projection  # transformers 5: CLIPTextModel has no text_model level
    row = RowLora(te, text=True)
    try:
        assert row.resolve(spelling) == "encoder_layers_1_mlp_fc2"
        assert row.resolve("text_model_encoder_layers_9_mlp_fc2") is None
        layers, _ = parse_state_dict(kohya_file_for_text(spelling), "te")
        assert row.prepare(layers["text_encoder"], "te").layers.keys() == {"encoder_layers_1_mlp_fc2"}
        bad, _ = parse_state_dict(kohya_file_for_text("text_model_encoder_layers_7_mlp_fc2"), "te")
        with pytest.raises(LoraFormatError, match="no layer 'lora_te_text_model_encoder_layers_7_mlp_fc2'"):
            row.prepare(bad["text_encoder"], "te")
    finally:
        row.remove()


def kohya_file_for_text(name: str) -> dict[str, torch.Tensor]:
    return {
        f"lora_te_{name}.lora_down.weight": torch.zeros(2, 64),
        f"lora_te_{name}.lora_up.weight": torch.zeros(32, 2),
    }


def test_sd1_lora_under_sgm_names_equals_it_under_diffusers_names() -> None:
    """Some tools write SD1 LoRAs with the original UNet's names too (diffusers reads those for SDXL
    only): the same LoCon under both spellings gives the same output. Tiny SD1 has an up level without
    attention, whose upsampler is ``output_blocks_<i>_1_conv``."""
    unet = ModelStore(tiny_sd_store()).load("sd1").text_model.unet
    outs = []
    g = torch.Generator().manual_seed(0)
    x, t, ctx = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([900.0, 30.0]),
        torch.randn(2, 5, 32, generator=g),
    )
    for sgm in (False, True):
        state = kohya_file(unet, [], 5, conv_rank=2, sgm=sgm, std=1.0)
        assert any("output_blocks_1_1_conv" in k for k in state) == sgm
        layers, _ = parse_state_dict(state, "f")
        row = RowLora(unet)
        try:
            prepared = row.prepare(layers["unet"], "f")
            with torch.inference_mode(), row.rows(Plan([prepared], torch.ones(1, prepared.rank)), 0):
                outs.append(unet(x, t, ctx).sample)
        finally:
            row.remove()
    with torch.inference_mode():
        base = unet(x, t, ctx).sample
    assert (outs[0] - base).abs().max() > 1e-2
    assert (outs[0] - outs[1]).abs().max() == 0


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_attach_wires_the_unet_and_every_text_encoder_of_a_text_model(name: str, tmp_path: Path) -> None:
    """The per-row LoRA set of a loaded SD model covers its UNet and each text encoder (found through the
    loaded model's ``text_model``): a missed encoder would silently drop a file's ``lora_te`` keys."""
    from service.models.lora import LoraIndex, attach

    model = ModelStore(tiny_sd_store()).load(name)
    adapters = attach(model, LoraIndex(tmp_path))
    assert adapters is not None
    encoders = ["text_encoder", "text_encoder_2"][: 2 if name == "sdxl" else 1]
    assert sorted(adapters.parts) == sorted(["unet", *encoders])
    unet = model.text_model.unet  # type: ignore[attr-defined]
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(adapters.parts["unet"].layers) == len(convs) and not adapters.parts["unet"].text
    assert all(adapters.parts[e].text and adapters.parts[e].layers for e in encoders)
