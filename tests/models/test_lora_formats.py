"""LoRA file parsing with the key names real files carry (kohya sd-scripts, diffusers' save_lora_weights,
PEFT, the old attention-processor files), what is refused (naming the key), and A1111 prompt tags."""

from __future__ import annotations

import json

import pytest
import torch

from service.models.lora import LoraFormatError, parse_state_dict
from service.sampling.errors import InputError
from service.serving.loras import prompt_tags

KOHYA_TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"
KOHYA_UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _pair(key: str, rank: int = 4, fan_in: int = 8, fan_out: int = 16, kohya: bool = True) -> dict:
    down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
    return {key + down: torch.zeros(rank, fan_in), key + up: torch.zeros(fan_out, rank)}


def test_kohya_keys_with_per_layer_alpha() -> None:
    state = {**_pair(KOHYA_UNET), f"{KOHYA_UNET}.alpha": torch.tensor(2.0, dtype=torch.float16)}
    state.update(_pair(KOHYA_TE))
    state.update(_pair("lora_te2_text_model_encoder_layers_1_self_attn_q_proj"))
    layers, fmt = parse_state_dict(state, "f")
    assert fmt == "kohya"
    w = layers["unet"]["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert w.rank == 4 and w.scale == 0.5 and w.key == KOHYA_UNET
    assert layers["text_encoder"]["text_model_encoder_layers_0_mlp_fc1"].scale == 1.0  # no alpha
    assert list(layers["text_encoder_2"]) == ["text_model_encoder_layers_1_self_attn_q_proj"]


def test_alpha_zero_means_rank_as_in_kohya() -> None:
    state = {**_pair(KOHYA_UNET), f"{KOHYA_UNET}.alpha": torch.tensor(0.0)}
    assert (
        parse_state_dict(state, "f")[0]["unet"][
            "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        ].scale
        == 1
    )


def test_every_diffusers_layout() -> None:
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    te = "text_model.encoder.layers.0"
    state = {
        **_pair(f"unet.{attn}.to_k", kohya=False),  # PEFT
        f"unet.{attn}.to_v.lora.down.weight": torch.zeros(2, 8),  # save_lora_weights
        f"unet.{attn}.to_v.lora.up.weight": torch.zeros(8, 2),
        f"unet.{attn}.processor.to_out_lora.down.weight": torch.zeros(2, 8),  # attention processors
        f"unet.{attn}.processor.to_out_lora.up.weight": torch.zeros(8, 2),
        f"{attn}.processor.to_q_lora.down.weight": torch.zeros(2, 8),  # the first files: no prefix
        f"{attn}.processor.to_q_lora.up.weight": torch.zeros(8, 2),
        f"text_encoder.{te}.self_attn.to_q_lora.down.weight": torch.zeros(2, 8),
        f"text_encoder.{te}.self_attn.to_q_lora.up.weight": torch.zeros(8, 2),
        f"text_encoder.{te}.mlp.fc1.lora_linear_layer.down.weight": torch.zeros(2, 8),
        f"text_encoder.{te}.mlp.fc1.lora_linear_layer.up.weight": torch.zeros(8, 2),
        **_pair(f"text_encoder_2.{te}.self_attn.k_proj", kohya=False),
        f"text_encoder_2.{te}.self_attn.k_proj.alpha": torch.tensor(8.0),
    }
    layers, fmt = parse_state_dict(state, "f")
    assert fmt == "diffusers"
    flat = attn.replace(".", "_")
    assert set(layers["unet"]) == {f"{flat}_to_k", f"{flat}_to_v", f"{flat}_to_out_0", f"{flat}_to_q"}
    assert set(layers["text_encoder"]) == {
        "text_model_encoder_layers_0_self_attn_q_proj",
        "text_model_encoder_layers_0_mlp_fc1",
    }
    assert layers["text_encoder_2"]["text_model_encoder_layers_0_self_attn_k_proj"].scale == 2.0


def test_diffusers_adapter_metadata_sets_alpha() -> None:
    """diffusers' save_lora_weights(unet_lora_adapter_metadata=...) writes the LoraConfig into the
    header; PEFT scales by lora_alpha / r (alpha_pattern per module, rsLoRA by alpha / sqrt(r))."""
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    state = {**_pair(f"{attn}.to_q", kohya=False), **_pair(f"{attn}.to_k", kohya=False)}
    state.update(_pair("text_encoder.text_model.encoder.layers.0.mlp.fc1", kohya=False))
    meta = {
        "unet.lora_alpha": 8,
        "unet.r": 4,
        "unet.alpha_pattern": {"attn1.to_k": 2},
        "text_encoder.lora_alpha": 4,
        "text_encoder.use_rslora": True,
    }
    layers, _ = parse_state_dict(state, "f", {"lora_adapter_metadata": json.dumps(meta)})
    unet = layers["unet"]
    assert unet["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].scale == 2.0
    assert unet["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"].scale == 0.5
    assert layers["text_encoder"]["text_model_encoder_layers_0_mlp_fc1"].scale == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("key", "what"),
    [
        (f"{KOHYA_UNET}.hada_w1_a", "LoHa"),
        (f"{KOHYA_UNET}.lokr_w1", "LoKr"),
        (f"{KOHYA_UNET}.dora_scale", "DoRA"),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
        (f"{KOHYA_UNET}.lora_mid.weight", "lora_mid"),
        (f"{KOHYA_UNET}.oft_blocks", "OFT"),
        (f"{KOHYA_UNET}.diff", "full"),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_B.bias", "biases"),
    ],
)
def test_unsupported_adapters_are_refused_naming_the_key(key: str, what: str) -> None:
    state = {**_pair(KOHYA_UNET), key: torch.zeros(4)}
    with pytest.raises(LoraFormatError, match=what) as info:
        parse_state_dict(state, "f")
    assert repr(key) in str(info.value)


def test_bad_files_are_refused_naming_the_key() -> None:
    with pytest.raises(LoraFormatError, match="'model.weight' is in no LoRA layout"):
        parse_state_dict({**_pair(KOHYA_UNET), "model.weight": torch.zeros(1)}, "f")
    with pytest.raises(LoraFormatError, match="no LoRA layers"):
        parse_state_dict({}, "f")
    with pytest.raises(LoraFormatError, match=f"{KOHYA_UNET!r} lacks"):
        parse_state_dict({f"{KOHYA_UNET}.lora_down.weight": torch.zeros(2, 2)}, "f")
    bad = _pair(KOHYA_UNET)
    bad[f"{KOHYA_UNET}.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(LoraFormatError, match="lora_up.weight' holds NaN"):
        parse_state_dict(bad, "f")
    with pytest.raises(LoraFormatError, match="alpha.*holds NaN"):
        parse_state_dict({**_pair(KOHYA_UNET), f"{KOHYA_UNET}.alpha": torch.tensor(float("inf"))}, "f")
    with pytest.raises(LoraFormatError, match="does not fit"):
        parse_state_dict(
            {**_pair(KOHYA_UNET, rank=4), f"{KOHYA_UNET}.lora_up.weight": torch.zeros(16, 3)}, "f"
        )


def test_prompt_tags() -> None:
    """A1111's extra_networks_lora: (name, text-encoder weight, UNet weight); the UNet's defaults to
    the text encoders' final one, ``te=`` / ``unet=`` override the positional ones."""
    assert prompt_tags("a cat, <lora:style_1:0.8>, red <lora:b>") == (
        "a cat, red",
        [("style_1", 0.8, 0.8), ("b", 1.0, 1.0)],
    )
    assert prompt_tags("plain") == ("plain", [])
    assert prompt_tags(None) == (None, [])
    assert prompt_tags("<lora:x:0.5:te=1>") == ("", [("x", 1.0, 1.0)])
    assert prompt_tags("<lora:x:1:0.2>") == ("", [("x", 1.0, 0.2)])
    assert prompt_tags("<lora:x:te=0.5:unet=1>") == ("", [("x", 0.5, 1.0)])
    assert prompt_tags("<lora:detail_tweaker(v1.5):0.7>") == ("", [("detail_tweaker(v1.5)", 0.7, 0.7)])
    for bad in ("<lora:x:abc>", "<lora:x:1:1:8>", "<lora:x:dyn=8>", "<lora:x:unet=q>"):
        with pytest.raises(InputError):
            prompt_tags(bad)


@pytest.mark.parametrize("weight", ["nan", "NaN", "inf", "-inf", "1e400", "11"])
def test_prompt_tag_weights_must_be_finite(weight: str) -> None:
    with pytest.raises(InputError) as info:
        prompt_tags(f"a cat <lora:name:{weight}>")
    assert info.value.field == "prompt" and f"<lora:name:{weight}>" in str(info.value)
