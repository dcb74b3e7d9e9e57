"""Tiny random SD3 and Flux models for tests, in the diffusers layout (nothing is downloaded).

SD3: MMDiT (1 layer), CLIP-L and CLIP-G (the byte-level tokenizer of sd_tiny), optional T5 (the
same tokenizer: any tokenizer fits a random T5), a 2-level VAE with SD3's shift factor. Flux:
schnell (no guidance input) or dev (``guidance_embeds``), CLIP-L + T5. Latents are 4 x 8 x 8 for
16 x 16 images (Flux packs them into 16 tokens of 16 channels).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from tests.support.sd_tiny import text_encoder, write_tokenizer

SIZE, T5_LEN, T5_DIM = 16, 8, 64


def _vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=SIZE,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ).eval()


def _t5(vocab: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=vocab - 1
    )
    return T5EncoderModel(cfg).eval()


def _calm(model: Any, layer: Any) -> Any:
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)  # random output layers start at zero in diffusers: give them a value
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()
    return model


def tiny_flux_config(guidance: bool) -> dict[str, Any]:
    """A one-block-each Flux transformer (16 latent channels, patch 1) for tests and smoke runs."""
    return {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_DIM,
        "pooled_projection_dim": 32,
        "guidance_embeds": guidance,
        "axes_dims_rope": (2, 2, 4),
    }


def make_flow_components(family: str, vocab: int, t5: bool = True, guidance: bool = False) -> dict[str, Any]:
    """Components by model_index name (tokenizers are written by :func:`save_flow`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    comps: dict[str, Any] = {"vae": _vae(3)}
    torch.manual_seed(0)
    if family == "sd3":
        tr = SD3Transformer2DModel(
            sample_size=SIZE // 2,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
        )
        comps["transformer"] = _calm(tr, tr.proj_out)
        comps["text_encoder"] = text_encoder(vocab, 32, True, 1)
        comps["text_encoder_2"] = text_encoder(vocab, 32, True, 2)
        if t5:
            comps["text_encoder_3"] = _t5(vocab, 4)
        comps["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        tr = FluxTransformer2DModel(**tiny_flux_config(guidance))
        comps["transformer"] = _calm(tr, tr.proj_out)
        comps["text_encoder"] = text_encoder(vocab, 32, False, 1)
        comps["text_encoder_2"] = _t5(vocab, 4)
        comps["scheduler"] = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        )
    return comps


def save_flow(folder: Path, family: str, t5: bool = True, guidance: bool = False) -> Path:
    vocab = write_tokenizer(folder / "tokenizer")
    comps = make_flow_components(family, vocab, t5, guidance)
    index: dict[str, Any] = {"_class_name": "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"}
    for name, part in comps.items():
        part.save_pretrained(str(folder / name))
        lib = "transformers" if name.startswith("text_encoder") else "diffusers"
        index[name] = [lib, type(part).__name__]
    for enc in [k for k in comps if k.startswith("text_encoder")]:
        tok = "tokenizer" + enc.removeprefix("text_encoder")
        if tok != "tokenizer":
            write_tokenizer(folder / tok)
        index[tok] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_manifest(folder: Path, kind: str, **defaults: Any) -> None:
    manifest = {
        "name": folder.name,
        "kind": kind,
        "description": f"tiny random {kind} test model",
        "defaults": {
            "sampler": "euler",
            "schedule": "flow",
            "steps": 3,
            "width": SIZE,
            "height": SIZE,
            **defaults,
        },
        "max_size": 64,
        "max_sequence_length": T5_LEN,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def load_tokenizers(folder: Path) -> dict[str, Any]:
    from transformers import CLIPTokenizer

    return {
        p.name: CLIPTokenizer.from_pretrained(str(p))
        for p in folder.iterdir()
        if p.name.startswith("tokenizer")
    }


_STORE: dict[str, Path] = {}
_LOCK = threading.Lock()


def tiny_flow_store() -> Path:
    """A store with sd3 (CFG, T5), sd3not5 (no T5), flux_schnell and flux_dev, built once per process."""
    with _LOCK:
        if "root" in _STORE:
            return _STORE["root"]
        root = Path(tempfile.mkdtemp(prefix="tiny-flow-store-"))
        atexit.register(shutil.rmtree, root, True)
        save_flow(root / "sd3", "sd3")
        write_manifest(root / "sd3", "sd3", cfg_scale=4.0)
        save_flow(root / "sd3not5", "sd3", t5=False)
        write_manifest(root / "sd3not5", "sd3", cfg_scale=4.0)
        save_flow(root / "flux_schnell", "flux")
        write_manifest(root / "flux_schnell", "flux", cfg_scale=1.0)
        save_flow(root / "flux_dev", "flux", guidance=True)
        write_manifest(root / "flux_dev", "flux", cfg_scale=1.0, guidance=3.5)
        _STORE["root"] = root
        return root


def diffusers_pipeline(components: Any, folder: Path, cls_name: str, **scheduler_config: Any) -> Any:
    """diffusers' pipeline ``cls_name`` (StableDiffusion3Pipeline, FluxImg2ImgPipeline, ...) on the
    modules of a loaded model (``FlowModel.components``), its scheduler read from ``folder``
    (``scheduler_config``: overrides, e.g. shift=6.0): the reference the flow tests compare with."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"), **scheduler_config)
    parts = {**components.text_encoders, **components.tokenizers}
    if cls_name.startswith("StableDiffusion3") and "text_encoder_3" not in parts:
        parts.update(text_encoder_3=None, tokenizer_3=None)
    pipe = getattr(diffusers, cls_name)(
        transformer=components.transformer, vae=components.vae, scheduler=sched, **parts
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sd3_pipeline(
    pipe: Any, prompt: str, steps: int, cfg_scale: float, output_type: str, **extra: Any
) -> Any:
    """An SD3 pipeline's images for ``prompt`` at the tiny models' size, seed 7 (the flow tests' seed),
    T5 tokens capped as the models are built; ``extra``: e.g. ``image`` and ``strength`` for img2img."""
    return pipe(
        prompt,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        generator=torch.Generator().manual_seed(7),
        output_type=output_type,
        max_sequence_length=T5_LEN,
        **extra,
    ).images
