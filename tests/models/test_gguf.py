"""GGUF transformers (city96's ComfyUI-GGUF files): dequantization bit-equal to gguf-py's numpy
reference for every supported type, Flux loaded from a GGUF equal to the same weights from a
safetensors file, weights kept quantized in memory, and refusals naming the file and the type."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from service.models.quant.ggml import TYPES, dequantize
from service.models.quant.qtensor import QLinear
from service.models.sd_loader import SDLoadError
from service.models.store import ModelStore, memory_bytes
from service.models.text_generate import generate
from tests.support.flow_single_file import flux_to_original
from tests.support.flow_tiny import tiny_flow_store, write_manifest
from tests.support.gguf_files import KQUANTS, flux_folder, random_blocks, write_gguf

TYPE_NAMES = [q.name for q in TYPES.values()]


@pytest.mark.parametrize("name", TYPE_NAMES)
def test_dequantize_is_gguf_py_bit_for_bit(name: str) -> None:
    rng = np.random.default_rng(1)
    q = TYPES[[k for k, v in TYPES.items() if v.name == name][0]]
    rows, cols = 5, 512
    if name in KQUANTS:
        raw = random_blocks(name, rows, cols, rng)
    else:  # gguf-py's own quantizer: the bytes llama.cpp's writes for these types
        x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
        raw = gguf.quants.quantize(x, T[name]).view(np.uint8).reshape(rows, -1)
    want = gguf.quants.dequantize(raw, T[name]).astype(np.float32).reshape(rows, cols)
    got = dequantize(torch.from_numpy(raw.copy()), q).numpy()
    assert np.isfinite(want).all() and np.array_equal(got, want)


WIDE = {  # the tiny store's Flux with 256-wide rows, so every ggml block type fits its weights
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def _flux_folder(root: Path, name: str, weights: str) -> Path:
    return flux_folder(root, name, weights, WIDE)


def _original_weights() -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**WIDE)
    with torch.no_grad():
        tr.proj_out.weight.normal_(0, 0.05)  # diffusers starts the output layer at zero
    return flux_to_original({k: v.detach().clone() for k, v in tr.state_dict().items()})


def _pair(root: Path, want: str) -> tuple[Any, Any, dict[str, str]]:
    """(the GGUF model, the same weights from an original-layout safetensors file, key -> type)."""
    from safetensors.torch import save_file

    sd = _original_weights()
    gg = _flux_folder(root, f"flux-{want.lower()}", f"flux1-dev-{want}.gguf")
    ref, types = write_gguf(gg / f"flux1-dev-{want}.gguf", sd, want, "flux")
    st = _flux_folder(root, f"flux-{want.lower()}-st", "flux1-dev.safetensors")
    save_file(ref, str(st / "flux1-dev.safetensors"))
    store = ModelStore(root)
    return store.load(gg.name), store.load(st.name), types


# every type's dequantization is checked bit for bit above; end to end: one of each kind of block
@pytest.mark.parametrize("want", ["Q8_0", "Q4_1", "Q5_0", "BF16", "Q3_K", "Q4_K", "Q6_K"])
def test_flux_gguf_equals_its_weights_from_safetensors(tmp_path: Path, want: str) -> None:
    one, two, types = _pair(tmp_path, want)
    tr = one.text_model.transformer  # type: ignore[attr-defined]
    held = {m.qtype.name for m in tr.modules() if isinstance(m, QLinear)}
    assert want in held and held <= set(types.values())  # kept quantized, per layer its file type
    n_linear = sum(1 for m in two.text_model.transformer.modules() if type(m) is torch.nn.Linear)  # type: ignore[attr-defined]
    assert sum(1 for m in tr.modules() if isinstance(m, QLinear)) == n_linear
    kw = {"seeds": [3], "steps": 3, "guidance": 2.0, "output": "latents"}
    a = generate(one.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    b = generate(two.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    assert a.abs().max() > 0.1 and (a - b).abs().max() < 1e-5


def test_gguf_weights_stay_quantized_in_memory(tmp_path: Path) -> None:
    one, two, _ = _pair(tmp_path, "Q4_0")
    q = memory_bytes(one.text_model.transformer)  # type: ignore[attr-defined]
    f = memory_bytes(two.text_model.transformer)  # type: ignore[attr-defined]
    # Q4_0 is 18 bytes per 32 weights (4.5 bits): the float32 model is ~7x; biases and norms stay f32
    assert q < f / 5, (q, f)


def _bad_file(path: Path, arch: str = "flux", raw_type: T | None = None) -> None:
    w = gguf.GGUFWriter(path=None, arch=arch)
    data = np.zeros((4, 64), np.float32)
    if raw_type is None:
        w.add_tensor("double_blocks.0.img_attn.proj.weight", data)
    else:
        block, nbytes = gguf.GGML_QUANT_SIZES[raw_type]
        w.add_tensor("double_blocks.0.img_attn.proj.weight", np.zeros((4, 256 // block * nbytes), np.uint8),
                     raw_dtype=raw_type)  # fmt: skip
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    ("arch", "raw_type", "match"),
    [
        (
            "flux",
            T.IQ4_NL,
            r"flux1-dev-IQ4\.gguf: tensor 'double_blocks.0.img_attn.proj.weight' is IQ4_NL.*"
            r"supported: F32, F16, Q4_0.*Q6_K, BF16",
        ),  # fmt: skip
        (
            "sdxl",
            None,
            r"flux1-dev-IQ4\.gguf: GGUF architecture 'sdxl'; this service loads GGUF transformers "
            r"of flux, sd3",
        ),  # fmt: skip
        ("sd3", None, r"a GGUF sd3 transformer, but the manifest's kind is flux"),
    ],
)
def test_unsupported_files_are_refused_naming_file_and_type(
    tmp_path: Path, arch: str, raw_type: T | None, match: str
) -> None:
    folder = _flux_folder(tmp_path, "fluxq", "flux1-dev-IQ4.gguf")
    _bad_file(folder / "flux1-dev-IQ4.gguf", arch, raw_type)
    with pytest.raises(SDLoadError, match=match):
        ModelStore(tmp_path).load("fluxq")


def test_a_file_named_gguf_that_is_not_one(tmp_path: Path) -> None:
    folder = _flux_folder(tmp_path, "fluxq", "flux1-dev-Q8_0.gguf")
    (folder / "flux1-dev-Q8_0.gguf").write_bytes(b"PK\x03\x04 a zip, not GGUF")
    with pytest.raises(SDLoadError, match=r"flux1-dev-Q8_0\.gguf: not a GGUF file"):
        ModelStore(tmp_path).load("fluxq")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fastapi.testclient import TestClient
    from safetensors.torch import save_file

    from service.api.app import create_app
    from service.api.settings import Settings

    root = tmp_path_factory.mktemp("gguf-store")
    gg = _flux_folder(root, "flux1-dev-Q4_K_S", "flux1-dev-Q4_K_S.gguf")
    ref, _ = write_gguf(gg / "flux1-dev-Q4_K_S.gguf", _original_weights(), "Q4_K", "flux")
    st = _flux_folder(root, "flux-dev-st", "flux1-dev.safetensors")
    save_file(ref, str(st / "flux1-dev.safetensors"))
    bad = _flux_folder(root, "flux-iq4", "flux1-dev-IQ4_NL.gguf")
    _bad_file(bad / "flux1-dev-IQ4_NL.gguf", "flux", T.IQ4_NL)
    with TestClient(create_app(Settings(model_store=root, torch_threads=1, batch_wait_ms=0))) as c:
        yield c


def test_gguf_over_http_equals_safetensors_and_lists_its_types(client: Any) -> None:
    import base64
    import io

    from PIL import Image

    body = {"prompt": "the red cat", "steps": 3, "seed": 5, "guidance": 2.0}
    out = []
    for model in ("flux1-dev-Q4_K_S", "flux-dev-st"):
        r = client.post("/sample", json={**body, "model": model})
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["images"][0])
        out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16))
    assert np.abs(out[0] - out[1]).max() <= 1
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    q, f = models["flux1-dev-Q4_K_S"], models["flux-dev-st"]
    assert q["quantization"]["Q4_K"] > 0 and "quantization" not in f
    assert q["memory_bytes"] < f["memory_bytes"] / 3  # Q4_K: 4.5 bits a weight, float32: 32


def test_an_unsupported_type_over_http_is_the_load_failed_error(client: Any) -> None:
    r = client.post("/sample", json={"prompt": "x", "steps": 1, "model": "flux-iq4"})
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert detail["code"] == "load_failed"
    assert (
        "flux1-dev-IQ4_NL.gguf: tensor 'double_blocks.0.img_attn.proj.weight' is IQ4_NL" in detail["message"]
    )
    assert (
        "supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16"
        in detail["message"]
    )


SD3_WIDE = {  # the tiny store's SD3 with 256-wide rows
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 256,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 16,
}


@pytest.mark.parametrize("want", ["Q8_0", "Q5_0", "Q4_K"])
def test_sd3_gguf_equals_its_weights_from_safetensors(tmp_path: Path, want: str) -> None:
    """sd3.5_large-Q5_0.gguf's layout: SD3's original keys (joint_blocks.*), arch sd3."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from tests.support.flow_single_file import PREFIX, sd3_to_original

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**SD3_WIDE)
    with torch.no_grad():
        tr.proj_out.weight.normal_(0, 0.05)
    sd = sd3_to_original({k: v.detach().clone() for k, v in tr.state_dict().items()}, 2)
    sd = {k.removeprefix(PREFIX): v for k, v in sd.items()}  # city96's files drop the prefix
    folders = []
    for name, weights in (("sd3q", f"sd3.5_large-{want}.gguf"), ("sd3st", "sd3.5_large.safetensors")):
        folder = tmp_path / name
        shutil.copytree(tiny_flow_store() / "sd3", folder / "config")
        shutil.rmtree(folder / "config" / "transformer")
        tr.save_config(str(folder / "config" / "transformer"))
        write_manifest(folder, "sd3", cfg_scale=4.0)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest |= {"weights": weights, "config": "config"}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        folders.append(folder)
    ref, types = write_gguf(folders[0] / f"sd3.5_large-{want}.gguf", sd, want, "sd3")
    save_file({PREFIX + k: v for k, v in ref.items()}, str(folders[1] / "sd3.5_large.safetensors"))
    one, two = ModelStore(tmp_path).load("sd3q"), ModelStore(tmp_path).load("sd3st")
    held = {m.qtype.name for m in one.text_model.transformer.modules() if isinstance(m, QLinear)}  # type: ignore[attr-defined]
    assert want in held and held <= set(types.values())
    kw = {"seeds": [3], "steps": 3, "cfg_scale": 4.0, "output": "latents"}
    a = generate(one.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    b = generate(two.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    assert a.abs().max() > 0.1 and (a - b).abs().max() < 1e-5


def test_a_flux_lora_on_a_gguf_model_equals_it_on_the_safetensors_model(tmp_path: Path) -> None:
    """GGUF + a kohya LoRA (the usual pairing): the per-row LoRA hooks see QLinear as a linear layer."""
    from safetensors.torch import save_file

    from service.models.lora import LoraIndex, attach
    from tests.support import flux_lora_files as files

    one, two, _ = _pair(tmp_path / "store", "Q5_K")
    layers = files.bfl_layers(two.text_model.transformer, rank=4, seed=1)  # type: ignore[attr-defined]
    (tmp_path / "loras").mkdir()
    save_file(files.kohya(layers, alpha=2.0, dtype=torch.float32), str(tmp_path / "loras" / "a.safetensors"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.7, 0.3])
    cond = {"context": torch.randn(2, 8, 64, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    cond["guidance"] = torch.full([2], 3.5)
    outs = []
    for model in (one, two):
        adapters = attach(model, LoraIndex(tmp_path))
        assert adapters is not None
        try:
            rows = adapters.encode(adapters.resolve([("a", 0.8)]), 2)
            with torch.inference_mode(), adapters.call(rows):
                outs.append(model.text_model.velocity(x, t, **cond))  # type: ignore[attr-defined]
            with torch.inference_mode():
                outs.append(model.text_model.velocity(x, t, **cond))  # type: ignore[attr-defined]
        finally:
            adapters.close()
    lora_q, base_q, lora_f, base_f = outs
    assert (lora_f - base_f).abs().max() > 1e-3  # the LoRA changes the output
    assert (lora_q - lora_f).abs().max() < 1e-5 and (base_q - base_f).abs().max() < 1e-5


def test_a_truncated_gguf_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    """A download cut short (or a header claiming a 2**40-value tensor) is an error, not a huge allocation."""
    folder = _flux_folder(tmp_path, "fluxq", "flux1-dev-Q8_0.gguf")
    path = folder / "flux1-dev-Q8_0.gguf"
    write_gguf(path, {"double_blocks.0.img_attn.proj.weight": torch.randn(256, 256)}, "Q8_0", "flux")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        SDLoadError, match=r"flux1-dev-Q8_0\.gguf: tensor 'double_blocks.0.img_attn.proj.weight' lies"
    ):
        ModelStore(tmp_path).load("fluxq")


def test_a_gguf_dropped_at_the_top_of_the_store_is_reported(tmp_path: Path) -> None:
    """Users drop ComfyUI's files next to their checkpoints: the store says a model is a folder."""
    from service.models.store import skip_reason

    (tmp_path / "flux1-dev-Q8_0.gguf").write_bytes(b"GGUF")
    reason = skip_reason(tmp_path / "flux1-dev-Q8_0.gguf")
    assert reason and "a weights file at the top of the store" in reason
