"""Flux LoRAs in the layouts people share, applied per row, against diffusers' own loader: the file
read by ``FluxPipeline.lora_state_dict`` (diffusers' kohya / XLabs converters) and loaded into the
transformer with ``load_lora_adapter`` (PEFT), at the same weight; rows without the LoRA stay the base
model's. Refusals name the file and the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from service.models.flow_nets import FluxVelocity
from service.models.lora import LoraError, LoraIndex, attach
from service.models.store import ModelStore
from tests.support import flux_lora_files as files
from tests.support.flow_tiny import tiny_flow_store

pytest.importorskip("peft")  # diffusers' load_lora_adapter needs it (installed with the test extras)
WEIGHT = 0.7


@pytest.fixture(scope="module")
def flux() -> Any:
    return ModelStore(tiny_flow_store()).load("flux_dev")


def _save(state: dict[str, Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _inputs(model: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    tm = model.text_model
    cfg = tm.transformer.config
    x = torch.randn(2, int(cfg.in_channels) // 4, 8, 8, generator=g)
    cond = {
        "context": torch.randn(2, 8, int(cfg.joint_attention_dim), generator=g),
        "pooled": torch.randn(2, int(cfg.pooled_projection_dim), generator=g),
        "guidance": torch.full([2], 3.5),
    }
    return x, torch.tensor([0.7, 0.3]), cond


def _diffusers(state: dict[str, Tensor], weight: float) -> Any:
    """diffusers' transformer with the LoRA as diffusers reads the same tensors."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(str(tiny_flow_store() / "flux_dev" / "transformer"))
    converted = FluxPipeline.lora_state_dict({k: v.clone() for k, v in state.items()})
    # diffusers' kohya converter leaves the embedders' and final layer's keys without "transformer.",
    # so its loader drops them; kohya's and ComfyUI's loaders apply them, and so do we
    converted = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    tr.load_lora_adapter(converted, prefix="transformer", adapter_name="a")
    tr.set_adapters(["a"], [weight])
    return tr.eval()


def _layers(model: Any) -> dict[str, tuple[Tensor, Tensor]]:
    return files.bfl_layers(model.text_model.transformer, rank=4, seed=1)


def _no_linear1(layers: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """diffusers' kohya converter splits ``linear1`` at FLUX.1's widths only: that split is checked at
    those widths in test_kohya_conversion_matches_diffusers_at_flux1_sizes."""
    return {k: v for k, v in layers.items() if not k.endswith("linear1")}


FORMATS = {
    "kohya": lambda m: files.kohya(_no_linear1(_layers(m)), alpha=2.0, dtype=torch.bfloat16),
    "xlabs": lambda m: files.xlabs(_layers(m)),
    "peft": lambda m: files.peft(m.text_model.transformer, rank=4, seed=2),
}


@pytest.mark.parametrize("layout", sorted(FORMATS))
def test_flux_lora_matches_diffusers(flux: Any, layout: str, tmp_path: Path) -> None:
    state = FORMATS[layout](flux)
    _save(state, tmp_path / "loras" / "a.safetensors")
    adapters = attach(flux, LoraIndex(tmp_path))
    assert adapters is not None and adapters.available() == ["a"]
    try:
        resolved = adapters.resolve([("a", WEIGHT)])
        x, t, cond = _inputs(flux)
        ours_net = flux.text_model.velocity
        theirs = FluxVelocity(_diffusers(state, WEIGHT))
        rows = adapters.encode(resolved, 2)
        rows[1] = adapters.encode([], 1)[0]  # the second row: no LoRA, in the same call
        with torch.inference_mode():
            with adapters.call(rows):
                ours = ours_net(x, t, **cond)
            base = ours_net(x, t, **cond)
            want = theirs(x, t, **cond)
        assert (want[0] - base[0]).abs().max() > 1e-3, "the LoRA must change the output"
        assert (ours[0] - want[0]).abs().max() <= 1e-4
        assert (ours[1] - base[1]).abs().max() <= 1e-5
    finally:
        adapters.close()


def test_bfl_dotted_names_equal_kohya(flux: Any, tmp_path: Path) -> None:
    """ComfyUI-style ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (no alpha) is the
    same LoRA as kohya's names with alpha = rank, which diffusers checks above."""
    layers = _layers(flux)
    _save(files.bfl_dotted(layers), tmp_path / "loras" / "dotted.safetensors")
    _save(files.kohya(layers, alpha=4.0, dtype=torch.float32), tmp_path / "loras" / "kohya.safetensors")
    adapters = attach(flux, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        x, t, cond = _inputs(flux)
        outs = []
        for name in ("dotted", "kohya"):
            with torch.inference_mode(), adapters.call(adapters.encode(adapters.resolve([(name, 1.0)]), 2)):
                outs.append(flux.text_model.velocity(x, t, **cond))
        assert (outs[0] - outs[1]).abs().max() <= 1e-5
    finally:
        adapters.close()


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(8),
          "double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(4, 16),
          "double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(48, 4)}, "Control LoRA"),
        ({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.ones(4, 8),
          "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.ones(8, 4)}, "T5"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": torch.ones(4, 4)}, "LoHa"),
        ({"lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight": torch.ones(4, 16),
          "lora_unet_double_blocks_9_img_attn_qkv.lora_up.weight": torch.ones(48, 4)}, "no layer"),
    ],
)  # fmt: skip
def test_unusable_flux_loras_are_refused_naming_file_and_reason(
    flux: Any, tmp_path: Path, state: dict[str, Tensor], reason: str
) -> None:
    _save(state, tmp_path / "loras" / "bad.safetensors")
    adapters = attach(flux, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        with pytest.raises(LoraError, match=rf"'bad'.*{reason}"):
            adapters.resolve([("bad", 1.0)])
    finally:
        adapters.close()


def test_a_flux_lora_on_an_sd3_model_is_refused(tmp_path: Path) -> None:
    sd3 = ModelStore(tiny_flow_store()).load("sd3")
    flux = ModelStore(tiny_flow_store()).load("flux_dev")
    _save(files.kohya(_layers(flux), 2.0, torch.float32), tmp_path / "loras" / "f.safetensors")
    adapters = attach(sd3, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        with pytest.raises(LoraError, match="'f' does not fit model 'sd3'.*no layer"):
            adapters.resolve([("f", 1.0)])
    finally:
        adapters.close()


def test_kohya_conversion_matches_diffusers_at_flux1_sizes() -> None:
    """Every kohya Flux layer at FLUX.1's real widths (3072, MLP 12288; 1-column inputs, rank 2): our
    per-layer update (up @ down * alpha / rank) equals that of diffusers' converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from service.models.lora import parse_state_dict

    d = 3072
    outs = {"double_blocks_0_img_attn_qkv": 3 * d, "double_blocks_0_img_attn_proj": d,
            "double_blocks_0_img_mlp_0": 4 * d, "double_blocks_0_img_mlp_2": d,
            "double_blocks_0_img_mod_lin": 6 * d, "double_blocks_0_txt_attn_qkv": 3 * d,
            "double_blocks_0_txt_attn_proj": d, "double_blocks_0_txt_mlp_0": 4 * d,
            "double_blocks_0_txt_mlp_2": d, "double_blocks_0_txt_mod_lin": 6 * d,
            "single_blocks_0_linear1": 7 * d, "single_blocks_0_linear2": d,
            "single_blocks_0_modulation_lin": 3 * d, "img_in": d, "txt_in": d,
            "time_in_in_layer": d, "time_in_out_layer": d, "vector_in_in_layer": d,
            "guidance_in_out_layer": d, "final_layer_linear": 64,
            "final_layer_adaLN_modulation_1": 2 * d}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    state: dict[str, Tensor] = {}
    for name, out in outs.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, 1, generator=g)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        if not name.startswith("final_layer"):  # diffusers drops the final layer's alpha
            state[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(state))
    ours, fmt = parse_state_dict(dict(state), "k.safetensors")
    assert fmt == "flux"
    want = {}
    for key, a in theirs.items():
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight").removeprefix("transformer.")
            want[stem.replace(".", "_")] = theirs[key.replace(".lora_A.", ".lora_B.")] @ a
    got = {k: w.up @ w.down * w.scale for k, w in ours["unet"].items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_http_flux_lora_is_diffusers_fused_lora(flux: Any, tmp_path: Path) -> None:
    """POST /sample with ``loras`` (and A1111's prompt tag) on a Flux model: the image of diffusers'
    transformer with the LoRA fused at that weight; ``GET /loras`` lists it; a row without it in the
    same server is the plain model."""
    import base64
    import io
    import shutil

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from service.api.app import create_app
    from service.api.settings import Settings
    from service.models.text_generate import generate

    shutil.copytree(tiny_flow_store() / "flux_dev", tmp_path / "flux_dev")
    state = files.kohya(_no_linear1(_layers(flux)), alpha=2.0, dtype=torch.bfloat16)
    _save(state, tmp_path / "flux_dev" / "loras" / "style.safetensors")
    body = {"model": "flux_dev", "prompt": "the red cat", "steps": 2, "seed": 5, "guidance": 2.0}

    def pixels(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)

    settings = Settings(model_store=tmp_path, torch_threads=1, batch_wait_ms=0)
    with TestClient(create_app(settings)) as c:
        listed = c.get("/loras").json()
        r1 = c.post("/sample", json={**body, "loras": [{"name": "style", "weight": WEIGHT}]})
        r2 = c.post("/sample", json={**body, "prompt": f"the red cat <lora:style:{WEIGHT}>"})
        r0 = c.post("/sample", json=body)
    assert "style" in str(listed)
    assert r1.status_code == r2.status_code == r0.status_code == 200, (r1.text, r2.text, r0.text)
    with_lora, tagged, plain = (pixels(r.json()["images"][0]) for r in (r1, r2, r0))
    tr = _diffusers(state, 1.0)
    tr.fuse_lora(lora_scale=WEIGHT)
    tr.unload_lora()
    ref = ModelStore(tiny_flow_store()).load("flux_dev").text_model  # type: ignore[attr-defined]
    ref.transformer.load_state_dict(tr.state_dict())
    direct = generate(ref, "the red cat", seeds=[5], steps=2, guidance=2.0)
    want = ((direct[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert np.abs(with_lora - want).max() <= 1 and np.array_equal(with_lora, tagged)
    assert np.abs(plain - want).max() > 2, "the LoRA must change the image"


def test_flux_clip_lora_changes_only_its_requests_encodings(flux: Any, tmp_path: Path) -> None:
    """kohya's ``lora_te1_`` (CLIP-L) layers of a Flux LoRA: the pooled prompt while the request's LoRA
    is active (cached apart), the plain encoding outside; T5's context untouched."""
    from service.models.lora import text_loras

    te = flux.text_model.components.text_encoders["text_encoder"]
    g = torch.Generator().manual_seed(0)
    state: dict[str, Tensor] = {}
    for n, mod in te.named_modules():
        if isinstance(mod, torch.nn.Linear) and n.endswith("q_proj"):
            k = "lora_te1_text_model_" + n.removeprefix("text_model.").replace(".", "_")
            state[f"{k}.lora_down.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.3
            state[f"{k}.lora_up.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.3
    _save(state, tmp_path / "loras" / "te.safetensors")
    adapters = attach(flux, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        resolved = adapters.resolve([("te", 1.0)])
        plain = flux.text_model.text.encode("a cat")
        with text_loras(flux, resolved):
            ctx, pooled = flux.text_model.text.encode("a cat")
        again = flux.text_model.text.encode("a cat")
        assert (pooled - plain[1]).abs().max() > 1e-2 and torch.equal(ctx, plain[0])
        assert torch.equal(again[1], plain[1])
    finally:
        adapters.close()


def test_sd3_peft_lora_matches_diffusers(tmp_path: Path) -> None:
    """SD3 / SD3.5 LoRAs as diffusers' trainers write them (``transformer.transformer_blocks.0.attn.to_q
    .lora_A.weight``), per row, equal to diffusers' ``load_lora_adapter`` at the same weight."""
    from diffusers import SD3Transformer2DModel

    sd3 = ModelStore(tiny_flow_store()).load("sd3")
    tr_ours = sd3.text_model.transformer  # type: ignore[attr-defined]
    state = files.peft(tr_ours, rank=4, seed=3)
    _save(state, tmp_path / "loras" / "s.safetensors")
    theirs = SD3Transformer2DModel.from_pretrained(str(tiny_flow_store() / "sd3" / "transformer"))
    theirs.load_lora_adapter(dict(state), prefix="transformer", adapter_name="a")
    theirs.set_adapters(["a"], [WEIGHT])
    adapters = attach(sd3, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        cfg = tr_ours.config
        g = torch.Generator().manual_seed(0)
        kw = {
            "hidden_states": torch.randn(2, int(cfg.in_channels), 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 8, int(cfg.joint_attention_dim), generator=g),
            "pooled_projections": torch.randn(2, int(cfg.pooled_projection_dim), generator=g),
            "timestep": torch.tensor([700.0, 300.0]),
        }
        with torch.inference_mode():
            with adapters.call(adapters.encode(adapters.resolve([("s", WEIGHT)]), 2)):
                ours = tr_ours(**kw).sample
            want = theirs(**kw).sample
            base = tr_ours(**kw).sample
        assert (want - base).abs().max() > 1e-3 and (ours - want).abs().max() <= 1e-4
    finally:
        adapters.close()


def test_a_lora_counts_in_its_models_memory(flux: Any, tmp_path: Path) -> None:
    """Reading a LoRA reserves its file's size in the model's memory budget (the pool's hook, which
    evicts idle models or refuses with 507) once per file version; one that does not fit is given
    back; a refused reservation leaves nothing loaded."""
    calls: list[int] = []
    flux.memory_hook = calls.append
    path = _save(
        files.kohya(_no_linear1(_layers(flux)), 2.0, torch.float32), tmp_path / "loras" / "a.safetensors"
    )
    _save({"lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight": torch.ones(4, 16),
           "lora_unet_double_blocks_9_img_attn_qkv.lora_up.weight": torch.ones(48, 4)},
          tmp_path / "loras" / "bad.safetensors")  # fmt: skip
    adapters = attach(flux, LoraIndex(tmp_path))
    assert adapters is not None
    try:
        adapters.resolve([("a", 1.0)])
        adapters.resolve([("a", 0.5)])
        size = path.stat().st_size
        assert calls == [size]
        with pytest.raises(LoraError):
            adapters.resolve([("bad", 1.0)])
        bad = (tmp_path / "loras" / "bad.safetensors").stat().st_size
        assert calls == [size, bad, -bad]

        def full(nbytes: int) -> None:
            raise MemoryError("no room")  # the pool raises ModelUnavailable (507) here

        flux.memory_hook = full
        (tmp_path / "loras" / "b.safetensors").write_bytes(path.read_bytes())
        with pytest.raises(MemoryError):
            adapters.resolve([("b", 1.0)])
        assert len(adapters._adapters) == 1
    finally:
        flux.memory_hook = None
        adapters.close()
