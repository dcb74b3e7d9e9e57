"""Per-row LoRA against diffusers' load_lora_weights + fuse_lora on tiny Stable Diffusion models, with
files carrying the key names real tools write (tests/support/lora_files.py): kohya LoCon (SD1: diffusers
UNet names; SDXL: the SGM names kohya writes, lora_te1_/lora_te2_), PEFT, diffusers' save_lora_weights
layout and the old attention-processor layout; UNet and every text encoder (<= 1e-4, fp32). A batch
mixing rows with no LoRA, A, B and A+B equals each row run alone (<= 1e-5)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")
pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (dev extra)")

from diffusers import StableDiffusionPipeline  # noqa: E402

from service.models.lora import LoraError, LoraIndex, attach  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from tests.support.lora_files import kohya_state, random_layers, real_file, reference_pipeline, save  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402

WEIGHT = 0.8


@pytest.fixture(scope="module")
def sd1() -> Any:
    return ModelStore(tiny_sd_store()).load("sd1")


def _inputs(model: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    unet = model.text_model.unet
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0, 1.0])
    ctx = torch.randn(4, 77, unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 300, (4, 77), generator=g)
    extra: dict[str, Any] = {}
    if model.text_model.is_sdxl:
        pooled = torch.randn(
            4, model.text_model.components.text_encoders[1].config.projection_dim, generator=g
        )
        extra = {
            "added_cond_kwargs": {
                "text_embeds": pooled,
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 4),
            }
        }
    return x, t, ctx, ids, extra


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("sd1", "kohya"),
        ("sd1", "peft"),
        ("sd1", "diffusers"),
        ("sd1", "old"),
        ("sdxl", "kohya"),
        ("sdxl", "peft"),
    ],
)
def test_matches_diffusers_fused_lora(name: str, layout: str, tmp_path: Path) -> None:
    model = ModelStore(tiny_sd_store()).load(name)
    path = save(real_file(model, layout, seed=1), tmp_path / "loras" / "a.safetensors")
    adapters = attach(model, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        resolved = adapters.resolve([("a", WEIGHT)])
        x, t, ctx, ids, extra = _inputs(model)
        unet, tes = model.text_model.unet, model.text_model.components.text_encoders
        pipe = reference_pipeline(model, path, WEIGHT)
        refs = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
        with torch.inference_mode():
            with adapters.call(adapters.encode(resolved, 4)):
                ours = unet(x, t, encoder_hidden_states=ctx, **extra).sample
            base = unet(x, t, encoder_hidden_states=ctx, **extra).sample
            want = pipe.unet(x, t, encoder_hidden_states=ctx, **extra).sample
            for te, ref in zip(tes, refs, strict=False):
                with adapters.text(resolved):
                    ours_text = te(ids)[0]
                want_text = ref(ids)[0]
                assert (ours_text - want_text).abs().max() <= 1e-4
                assert (te(ids)[0] - want_text).abs().max() > 1e-2  # outside the block: the base encoder
        assert (want - base).abs().max() > 1e-3, (
            "the LoRA must change the output for the test to mean anything"
        )
        assert (ours - want).abs().max() <= 1e-4
    finally:
        adapters.close()


def test_mixed_batch_equals_each_row_alone(sd1: Any, tmp_path: Path) -> None:
    save(real_file(sd1, "kohya", seed=3), tmp_path / "loras" / "a.safetensors")
    save(real_file(sd1, "peft", seed=5), tmp_path / "loras" / "b.safetensors")
    adapters = attach(sd1, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        a, b = adapters.resolve([("a", 0.7)]), adapters.resolve([("b", 1.2)])
        rows_of = [[], a, b, a + b]
        rows = torch.cat([adapters.encode(r, 1) for r in rows_of])
        x, t, ctx, _, _ = _inputs(sd1)
        unet = sd1.text_model.unet
        with torch.inference_mode():
            with adapters.call(rows):
                mixed = unet(x, t, encoder_hidden_states=ctx).sample
            alone = []
            for i, r in enumerate(rows_of):
                with adapters.call(adapters.encode(r, 1)):
                    alone.append(
                        unet(x[i : i + 1], t[i : i + 1], encoder_hidden_states=ctx[i : i + 1]).sample
                    )
        solo = torch.cat(alone)
        assert (mixed - solo).abs().max() <= 1e-5
        assert all((solo[i] - solo[0]).abs().max() > 1e-3 for i in (1, 2, 3))  # the rows do differ
    finally:
        adapters.close()


def test_a_lora_for_another_base_model_is_refused_naming_it(sd1: Any, tmp_path: Path) -> None:
    """An SDXL file (lora_te2_, SGM names) on SD1, a layer of another width, a LyCORIS file: each
    refused naming the key at fault."""
    sdxl = ModelStore(tiny_sd_store()).load("sdxl")
    save(real_file(sdxl, "kohya", seed=0), tmp_path / "loras" / "xl.safetensors")
    layers = random_layers(sd1.text_model.unet, 4, 0)
    name = next(n for n, (d, _) in layers.items() if d.dim() == 2)
    down, up = layers[name]
    layers[name] = (torch.randn(4, down.shape[1] + 8), up)
    save(kohya_state({"unet": layers}, None), tmp_path / "loras" / "other.safetensors")
    loha = "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"
    save({loha: torch.zeros(2, 2)}, tmp_path / "loras" / "loha.safetensors")
    adapters = attach(sd1, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        with pytest.raises(LoraError, match="'xl'.*(no text_encoder_2|no layer 'lora_unet_input_blocks)"):
            adapters.resolve([("xl", 1.0)])
        with pytest.raises(LoraError, match=f"'other'.*layer 'lora_unet_{name.replace('.', '_')}'.*another"):
            adapters.resolve([("other", 1.0)])
        with pytest.raises(LoraError, match=f"{loha!r}: LyCORIS LoHa"):
            adapters.resolve([("loha", 1.0)])
        with pytest.raises(LoraError, match="unknown LoRA 'nope'"):
            adapters.resolve([("nope", 1.0)])
    finally:
        adapters.close()


def test_a_file_written_by_diffusers_training_scripts(sd1: Any, tmp_path: Path) -> None:
    """What diffusers' train_text_to_image_lora / dreambooth_lora scripts save: PEFT adapters added with
    LoraConfig (lora_alpha != r, a rank_pattern, rsLoRA on the text encoder), trained (here: random
    lora_B), written by save_lora_weights with the adapters' configs as lora_adapter_metadata."""
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet, te = copy.deepcopy(sd1.text_model.unet), copy.deepcopy(sd1.text_model.components.text_encoders[0])
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                          target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                          rank_pattern={"attn2.to_q": 2})  # fmt: skip
    te_cfg = LoraConfig(r=4, lora_alpha=2, use_rslora=True, init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])  # fmt: skip
    unet.add_adapter(unet_cfg)
    te = inject_adapter_in_model(te_cfg, te)  # what transformers' add_adapter does (it wants peft >= 0.22)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for root in (unet, te):
            for name, p in root.named_parameters():
                if "lora_B" in name:  # "training": init leaves lora_B at zero
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "loras",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te)),
        weight_name="trained.safetensors",
        text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        **_collate_lora_metadata({"unet": unet}),
    )
    path = tmp_path / "loras" / "trained.safetensors"
    adapters = attach(sd1, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        resolved = adapters.resolve([("trained", WEIGHT)])
        x, t, ctx, ids, _ = _inputs(sd1)
        pipe = reference_pipeline(sd1, path, WEIGHT)
        with torch.inference_mode():
            with adapters.call(adapters.encode(resolved, 4)):
                ours = sd1.text_model.unet(x, t, encoder_hidden_states=ctx).sample
            with adapters.text(resolved):
                ours_text = sd1.text_model.components.text_encoders[0](ids)[0]
            want = pipe.unet(x, t, encoder_hidden_states=ctx).sample
            want_text = pipe.text_encoder(ids)[0]
            base = sd1.text_model.unet(x, t, encoder_hidden_states=ctx).sample
        assert (want - base).abs().max() > 1e-3
        assert (ours - want).abs().max() <= 1e-4
        assert (ours_text - want_text).abs().max() <= 1e-4
    finally:
        adapters.close()
