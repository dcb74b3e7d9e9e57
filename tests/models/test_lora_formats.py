"""LoRA file parsing (kohya / A1111, diffusers / PEFT, old diffusers processor keys), LyCORIS refused,
and A1111 prompt tags."""

from __future__ import annotations

import pytest
import torch

from service.api.lora_request import prompt_tags
from service.models.lora import LoraFormatError, parse_state_dict
from service.sampling.errors import InputError


def test_kohya_keys_with_alpha() -> None:
    state = {
        "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(16, 4),
        "lora_unet_down_blocks_0_attn1_to_q.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
    }
    layers, fmt = parse_state_dict(state, "x")
    assert fmt == "kohya"
    w = layers["unet"]["down_blocks_0_attn1_to_q"]
    assert w.rank == 4 and w.scale == 0.5
    assert layers["text_encoder"]["text_model_encoder_layers_0_mlp_fc1"].scale == 1.0


OLD = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"


def test_peft_and_old_diffusers_keys() -> None:
    state = {
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
        "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2),
        f"{OLD}.down.weight": torch.zeros(2, 8),
        f"{OLD}.up.weight": torch.zeros(8, 2),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
    }
    layers, fmt = parse_state_dict(state, "x")
    assert fmt == "diffusers"
    assert set(layers["unet"]) == {
        "mid_block_attentions_0_proj_in",
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
    }
    assert list(layers["text_encoder_2"]) == ["text_model_encoder_layers_0_self_attn_q_proj"]


def test_lycoris_and_empty_files_are_refused() -> None:
    with pytest.raises(LoraFormatError, match="LyCORIS"):
        parse_state_dict({"lora_unet_a.hada_w1_a": torch.zeros(1)}, "x")
    with pytest.raises(LoraFormatError, match="no LoRA layers"):
        parse_state_dict({"model.weight": torch.zeros(1)}, "x")
    with pytest.raises(LoraFormatError, match="lacks"):
        parse_state_dict({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, "x")


def test_prompt_tags() -> None:
    assert prompt_tags("a cat, <lora:style_1:0.8>, red <lora:b>") == (
        "a cat, red",
        [("style_1", 0.8), ("b", 1.0)],
    )
    assert prompt_tags("plain") == ("plain", [])
    assert prompt_tags(None) == (None, [])
    assert prompt_tags("<lora:x:0.5:te=1>") == ("", [("x", 0.5)])
    with pytest.raises(InputError):
        prompt_tags("<lora:x:abc>")
