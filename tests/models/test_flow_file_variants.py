"""Flux / SD3 single files in the forms people download: Comfy-Org's all-in-one fp8 checkpoints
(transformer + ``vae.`` + ``text_encoders.``), plain fp8 and bf16 weights, ComfyUI's scaled fp8
(``scaled_fp8`` marker + ``.scale_weight``) and per-layer ``.comfy_quant`` + ``.weight_scale``, a
diffusers-named transformer file; and the quantized formats we refuse (naming file and format).

The oracle: the same weights dequantized here (stored fp8 times its scale), saved in the diffusers
layout and loaded by diffusers' ``from_pretrained``; a generation through both gives the same latents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from service.models.sd_loader import SDLoadError
from service.models.store import ModelStore
from service.models.text_generate import generate
from tests.models.test_flow_single_file import _single_file_model
from tests.support.flow_single_file import PREFIX, flux_to_original, sd3_to_original
from tests.support.flow_tiny import tiny_flow_store

FP8 = torch.float8_e4m3fn
EXTRA = {  # what Comfy-Org's all-in-one files carry besides the transformer (ComfyUI's prefixes)
    "vae.decoder.conv_in.weight": torch.ones(2, 2),
    "first_stage_model.decoder.conv_in.weight": torch.ones(2, 2),
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(2),
    "text_encoders.t5xxl.transformer.shared.weight": torch.ones(2, 2),
}


def _transformer(family: str) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls, sub = (FluxTransformer2DModel, "flux_dev") if family == "flux" else (SD3Transformer2DModel, "sd3")
    return cls.from_pretrained(str(tiny_flow_store() / sub / "transformer"))


def _original(tr: Any, family: str) -> dict[str, Tensor]:
    sd = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    if family == "flux":
        return {PREFIX + k: v for k, v in flux_to_original(sd).items()}
    return sd3_to_original(sd, int(tr.config.num_layers))


def _quantize(sd: dict[str, Tensor], form: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the file's tensors, the real weights they stand for) for one storage form."""
    out: dict[str, Tensor] = {}
    real: dict[str, Tensor] = {}
    for i, (k, v) in enumerate(sd.items()):
        matrix = k.endswith(".weight") and v.dim() == 2
        if form == "bf16":
            out[k] = v.to(torch.bfloat16)
        elif form == "fp8":
            out[k] = v.to(FP8) if matrix else v
        elif form in ("scaled", "comfy_quant") and matrix:
            scale = torch.tensor(0.25 + 0.5 * (i % 3), dtype=torch.float32)  # fp8 holds v / scale
            out[k] = (v / scale).to(FP8)
            stem = k.removesuffix(".weight")
            if form == "scaled":  # ComfyUI's first scaled fp8 files (sd3.5_large_fp8_scaled)
                out[stem + ".scale_weight"] = scale
                out[stem + ".scale_input"] = torch.tensor(1.0)
            else:  # its per-layer quantization config
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                out[stem + ".weight_scale"] = scale
                out[stem + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
            real[k] = (out[k].float() * scale).to(torch.bfloat16).float()
            continue
        else:
            out[k] = v
        real[k] = out[k].float()
    if form == "scaled":
        out[PREFIX + "scaled_fp8"] = torch.zeros(0, dtype=FP8)
    return out, real


def _diffusers_state(real: dict[str, Tensor], tr: Any, family: str) -> dict[str, Tensor]:
    """The dequantized weights in diffusers' names (the map the existing single-file tests check)."""
    if family == "flux":
        from service.models.flux_keys import flux_to_diffusers

        inner = int(tr.config.num_attention_heads) * int(tr.config.attention_head_dim)
        return flux_to_diffusers(dict(real), inner, 4 * inner)
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(real))  # type: ignore[no-any-return]


def _store(tmp: Path, family: str, form: str, all_in_one: bool) -> tuple[Path, dict[str, Tensor], Any]:
    tr = _transformer(family)
    sd, real = _quantize(_original(tr, family), form)
    if all_in_one:
        sd |= EXTRA
    src = "flux_dev" if family == "flux" else "sd3"
    folder = _single_file_model(tmp, "file", "model.safetensors", src)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder, _diffusers_state(real, tr, family), tr


CASES = [
    ("flux", "fp8", True),  # Comfy-Org flux1-dev-fp8.safetensors
    ("flux", "bf16", False),  # flux1-dev.safetensors (BFL)
    ("flux", "scaled", False),
    ("flux", "comfy_quant", True),
    ("sd3", "scaled", True),  # Comfy-Org sd3.5_large_fp8_scaled.safetensors
    ("sd3", "comfy_quant", False),
]


@pytest.mark.parametrize(("family", "form", "all_in_one"), CASES)
def test_single_file_weights_are_the_dequantized_ones(
    tmp_path: Path, family: str, form: str, all_in_one: bool
) -> None:
    folder, want, _ = _store(tmp_path, family, form, all_in_one)
    from service.models.flow_loader import _single_file

    cls = type(_transformer(family))
    got = _single_file(cls, folder / "model.safetensors", folder / "config").state_dict()
    assert sorted(got) == sorted(want)
    worst = max((got[k].float() - want[k]).abs().max().item() for k in want)
    assert worst < 1e-6, f"{family} {form}: weights differ by {worst}"


@pytest.mark.parametrize(("family", "form"), [("flux", "scaled"), ("sd3", "comfy_quant")])
def test_scaled_fp8_generates_as_diffusers_with_the_real_weights(
    tmp_path: Path, family: str, form: str
) -> None:
    folder, want, tr = _store(tmp_path, family, form, True)
    src = "flux_dev" if family == "flux" else "sd3"
    ref = tmp_path / src  # a manifest names its folder
    shutil.copytree(tiny_flow_store() / src, ref)
    tr.load_state_dict(want)
    tr.save_pretrained(str(ref / "transformer"))  # diffusers writes, diffusers reads back
    store = ModelStore(tmp_path)
    kw: dict[str, Any] = {"seeds": [3], "steps": 2, "output": "latents"}
    kw |= {"guidance": 2.0} if family == "flux" else {"cfg_scale": 4.0}
    a = generate(store.load("file").text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    b = generate(store.load(src).text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    assert (a - b).abs().max() < 1e-4


def test_flux_diffusers_named_single_file(tmp_path: Path) -> None:
    from service.models.flow_loader import _single_file

    tr = _transformer("flux")
    folder = _single_file_model(tmp_path, "file", "model.safetensors", "flux_dev")
    save_file({k: v.contiguous() for k, v in tr.state_dict().items()}, str(folder / "model.safetensors"))
    got = _single_file(type(tr), folder / "model.safetensors", folder / "config").state_dict()
    assert all(torch.equal(got[k], v) for k, v in tr.state_dict().items())


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"double_blocks.0.img_attn.qkv.comfy_quant": json.dumps({"format": "nvfp4"})}, "nvfp4"),
        ({"double_blocks.0.img_attn.qkv.weight.absmax": None}, "bitsandbytes"),
    ],
)
def test_other_quantizations_are_refused_naming_file_and_format(
    tmp_path: Path, extra: dict[str, Any], reason: str
) -> None:
    from service.models.flow_loader import _single_file

    tr = _transformer("flux")
    sd = _original(tr, "flux")
    for k, v in extra.items():
        sd[PREFIX + k] = torch.ones(4) if v is None else torch.tensor(list(v.encode()), dtype=torch.uint8)
    folder = _single_file_model(tmp_path, "file", "model.safetensors", "flux_dev")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    with pytest.raises(SDLoadError, match=rf"model\.safetensors: .*{reason}.*not supported"):
        _single_file(type(tr), folder / "model.safetensors", folder / "config")
