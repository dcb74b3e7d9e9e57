"""Tiny random-weight Stable Diffusion models for tests: SD1-style (eps or v, 4 or 9 channels) and
SDXL-style, saved in the diffusers layout and as one original-layout .safetensors checkpoint.

Nothing is downloaded: the tokenizer is a small byte-level CLIP BPE written here (the 512 byte
symbols, a few merges, the two special tokens), the networks come from small diffusers and
transformers configs. The original-layout checkpoint is written with our own diffusers -> LDM
key mapping so the real loader's single-file path (diffusers' converters) can be exercised.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def write_tokenizer(folder: Path, pad: str = EOS) -> int:
    """A CLIP BPE tokenizer in ``folder``; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in MERGES] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    config = {"pad_token": pad, "model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = CLIPTokenizer.from_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return len(vocab)


def text_encoder(vocab: int, hidden: int, projection: bool, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def sdxl_added_conditioning(pooled: int) -> dict[str, Any]:
    """The config of SDXL's added conditioning (pooled text + 6 size/crop ids, 8 wide each) for a
    diffusers UNet or ControlNet whose pooled text embedding is ``pooled`` wide."""
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": pooled + 6 * 8,
    }


def _unet(in_channels: int, context: int, sdxl: bool, pooled: int, seed: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = sdxl_added_conditioning(pooled) if sdxl else {}
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=context,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **extra,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)  # a calmer random model: predictions of order 1, not 10
    return unet


def _vae(seed: int, scaling: float) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        scaling_factor=scaling,
    ).eval()


def _scheduler_config(prediction_type: str) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler

    s = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        steps_offset=1,
    )
    return dict(s.config)


def make_sd_components(
    sdxl: bool = False, prediction_type: str = "epsilon", inpainting: bool = False, seed: int = 0
) -> dict[str, Any]:
    """In-memory components (a dict with the diffusers pipeline component names)."""
    from diffusers import EulerDiscreteScheduler

    hidden = [32, 48] if sdxl else [32]
    comps: dict[str, Any] = {}
    for i, h in enumerate(hidden):
        suffix = "" if i == 0 else "_2"
        comps["text_encoder" + suffix] = (h, sdxl and i == 1, seed + 10 + i)
    comps["unet"] = _unet(9 if inpainting else 4, sum(hidden), sdxl, hidden[-1], seed)
    comps["vae"] = _vae(seed + 1, 0.13025 if sdxl else 0.18215)
    comps["scheduler"] = EulerDiscreteScheduler.from_config(_scheduler_config(prediction_type))
    return comps


def save_diffusers(
    folder: Path,
    sdxl: bool = False,
    prediction_type: str = "epsilon",
    inpainting: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny model in the diffusers layout (model_index.json + component folders)."""
    comps = make_sd_components(sdxl, prediction_type, inpainting, seed)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    }
    for name in [k for k in comps if k.startswith("text_encoder")]:
        hidden, proj, s = comps[name]
        tok_name = name.replace("text_encoder", "tokenizer")
        vocab = write_tokenizer(folder / tok_name, pad="!" if name.endswith("_2") else EOS)
        enc = text_encoder(vocab, hidden, proj, s)
        enc.save_pretrained(str(folder / name))
        index[name] = ["transformers", type(enc).__name__]
        index[tok_name] = ["transformers", "CLIPTokenizer"]
    comps["unet"].save_pretrained(str(folder / "unet"))
    comps["vae"].save_pretrained(str(folder / "vae"))
    comps["scheduler"].save_pretrained(str(folder / "scheduler"))
    index.update(
        unet=["diffusers", "UNet2DConditionModel"],
        vae=["diffusers", "AutoencoderKL"],
        scheduler=["diffusers", "EulerDiscreteScheduler"],
    )
    if not sdxl:
        index.update(
            safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
        )
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_manifest(folder: Path, **fields: Any) -> None:
    defaults = {
        "sampler": "euler",
        "schedule": "normal",
        "steps": 3,
        "cfg_scale": 5.0,
        "width": 64,
        "height": 64,
    }
    manifest = {
        "name": folder.name,
        "kind": "stable_diffusion",
        "description": "tiny random SD test model",
        "defaults": defaults,
        "max_size": 128,
        **fields,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


_STORE: dict[str, Path] = {}
_LOCK = threading.Lock()


def tiny_sd_store() -> Path:
    """A model store with tiny SD models, built once per test process (removed at exit).

    sd1 (eps, diffusers), sd1v (v-prediction, diffusers), sd1file (eps, single file + config folder),
    sd1inpaint (9-channel UNet), sdxl (diffusers), sdxlfile (single file).
    """
    from tests.support.sd_ldm import write_single_file

    with _LOCK:
        if "root" in _STORE:
            return _STORE["root"]
        root = Path(tempfile.mkdtemp(prefix="tiny-sd-store-"))
        atexit.register(shutil.rmtree, root, True)
        for name, kw in (
            ("sd1", {}),
            ("sd1v", {"prediction_type": "v_prediction"}),
            ("sd1inpaint", {"inpainting": True}),
            ("sdxl", {"sdxl": True}),
        ):
            save_diffusers(root / name, **kw)
            write_manifest(root / name)
        for name, src in (("sd1file", "sd1"), ("sdxlfile", "sdxl")):
            write_single_file(root / src, root / name / "model.safetensors", root / name / "config")
            write_manifest(root / name, weights="model.safetensors", config="config")
        _STORE["root"] = root
        return root


def digits_and_tiny_sd_store(store: Path) -> Path:
    """A model store with the shipped digits model (continuous-time) and a tiny SD 1.x model named
    ``sd1`` (random weights, diffusers layout, discrete-time): what frontend tests run against."""
    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "model_store" / "digits", store / "digits")
    save_diffusers(store / "sd1")
    write_manifest(store / "sd1")
    return store


@contextmanager
def frontend_server(factory: Any, add: Callable[[Path], Any] | None = None, **env: str) -> Iterator[Any]:
    """A live ``kdiff serve`` (tests/support/server.py) on :func:`digits_and_tiny_sd_store`, for a
    module's tests (``factory``: pytest's tmp_path_factory; ``add``: puts more in the store first,
    e.g. ControlNets; ``env``: its KDIFF_* settings)."""
    from tests.support.server import Server

    store = digits_and_tiny_sd_store(factory.mktemp("store"))
    if add is not None:
        add(store)
    srv = Server(store, factory.mktemp("log") / "server.log", **env)
    try:
        srv.wait_ready(120)
        yield srv
    finally:
        srv.stop()


def link_tiny_models(root: Path, names: tuple[str, ...] = ("sd1", "sdxl")) -> dict[str, Any]:
    """Link the tiny models ``names`` into the store at ``root`` (a server's) and load each here, as
    the test's own reference (diffusers pipelines are built from its components)."""
    from service.models.store import ModelStore

    tiny = tiny_sd_store()
    models = {}
    for name in names:
        (root / name).symlink_to(tiny / name, target_is_directory=True)
        models[name] = ModelStore(tiny).load(name)
    return models


def diffusers_pipeline(sd: Any, scheduler: Any, controlnet: Any = None) -> Any:
    """diffusers' pipeline for a loaded tiny model (SD 1.x or SDXL by ``sd.is_sdxl``; the ControlNet
    pipelines when ``controlnet``, a diffusers ControlNetModel, is given) on the model's own components:
    the reference the comparisons run."""
    import diffusers

    c = sd.components
    kw: dict[str, Any] = {
        "vae": c.vae,
        "text_encoder": c.text_encoders[0],
        "tokenizer": c.tokenizers[0],
        "unet": c.unet,
        "scheduler": scheduler,
    }
    name = "StableDiffusionXL" if sd.is_sdxl else "StableDiffusion"
    if controlnet is not None:
        union = type(controlnet).__name__ == "ControlNetUnionModel"  # ControlNet-Union (SDXL)
        kw["controlnet"], name = controlnet, name + ("ControlNetUnion" if union else "ControlNet")
    if sd.is_sdxl:
        kw |= {"text_encoder_2": c.text_encoders[1], "tokenizer_2": c.tokenizers[1]}
    else:
        kw |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, name + "Pipeline")(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe
