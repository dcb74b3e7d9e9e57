"""Tiny random IP-Adapters for the tiny SD models of ``sd_tiny``, saved in h94/IP-Adapter's published
layouts: ``.safetensors`` with flat ``image_proj.*`` / ``ip_adapter.<N>.to_k_ip.weight`` names and
``.bin`` with the two groups as a nested dict (``torch.save``), plain (``proj`` + ``norm``) and plus
(the tencent-ailab Resampler's names: ``latents``, ``proj_in``, ``layers.i.0.{norm1,norm2,to_q,to_kv,
to_out}``, ``layers.i.1.{0,1,3}``, ``proj_out``, ``norm_out``), with CLIP image encoders in the
transformers ``CLIPVisionModelWithProjection`` folder layout (h94's ``models/image_encoder``).

diffusers' own ``load_ip_adapter`` converts these names with ``strict=True``: a misnamed or misshaped
tensor fails the reference before it reaches ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ENCODERS = {  # name: (hidden_size, projection_dim); "vit-h" for SD1 and the SDXL vit-h adapters
    "image_encoder": (32, 24),
    "sdxl_models/image_encoder": (40, 36),
}


def save_encoder(folder: Path, hidden: int, projection: int, seed: int) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=projection,
    )
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


def _ln(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    return {"weight": 1 + 0.1 * torch.randn(n, generator=g), "bias": 0.1 * torch.randn(n, generator=g)}


def plain_proj(embed: int, cross: int, g: torch.Generator, tokens: int = 4) -> dict[str, torch.Tensor]:
    out = {
        "proj.weight": torch.randn(tokens * cross, embed, generator=g) / embed**0.5,
        "proj.bias": 0.1 * torch.randn(tokens * cross, generator=g),
    }
    return out | {f"norm.{k}": v for k, v in _ln(g, cross).items()}


def plus_proj(
    embed: int,
    cross: int,
    g: torch.Generator,
    dim: int = 48,
    heads: int = 1,
    queries: int = 16,
    depth: int = 4,
) -> dict[str, torch.Tensor]:
    inner = 64 * heads  # the Resampler's heads are 64 wide

    def lin(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i, generator=g) / i**0.5

    out = {
        "latents": torch.randn(1, queries, dim, generator=g) / dim**0.5,
        "proj_in.weight": lin(dim, embed),
        "proj_in.bias": 0.1 * torch.randn(dim, generator=g),
        "proj_out.weight": lin(cross, dim),
        "proj_out.bias": 0.1 * torch.randn(cross, generator=g),
    } | {f"norm_out.{k}": v for k, v in _ln(g, cross).items()}
    for i in range(depth):
        p = f"layers.{i}."
        out |= {f"{p}0.norm1.{k}": v for k, v in _ln(g, dim).items()}
        out |= {f"{p}0.norm2.{k}": v for k, v in _ln(g, dim).items()}
        out |= {f"{p}0.to_q.weight": lin(inner, dim), f"{p}0.to_kv.weight": lin(2 * inner, dim)}
        out |= {f"{p}0.to_out.weight": lin(dim, inner), f"{p}1.1.weight": lin(4 * dim, dim)}
        out |= {f"{p}1.3.weight": lin(dim, 4 * dim)} | {f"{p}1.0.{k}": v for k, v in _ln(g, dim).items()}
    return out


def ip_layers(unet: Any, g: torch.Generator, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """``<N>.to_k_ip.weight`` / ``to_v_ip.weight`` for the k-th cross-attention (N = 2k + 1), in the
    order of the UNet's attention processors."""
    cross = int(unet.config.cross_attention_dim)
    names = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    out = {}
    for k, name in enumerate(names):
        attn = unet.get_submodule(name.rsplit(".", 1)[0])
        hidden = int(attn.to_q.out_features)
        for kv in ("k", "v"):
            out[f"{2 * k + 1}.to_{kv}_ip.weight"] = (
                scale * torch.randn(hidden, cross, generator=g) / cross**0.5
            )
    return out


def save_adapter(path: Path, image_proj: dict[str, torch.Tensor], layers: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
        save_file(flat | {f"ip_adapter.{k}": v for k, v in layers.items()}, str(path))
    else:
        torch.save({"image_proj": image_proj, "ip_adapter": layers}, str(path))
    return path


def add_ip_adapters(store: Path, unets: dict[str, Any]) -> dict[str, Path]:
    """IP-Adapters in ``store/ipadapter/`` for the tiny ``sd1`` and ``sdxl`` UNets (``unets``), in h94's
    layout: ``ip-adapter_sd15.safetensors`` (plain), ``ip-adapter-plus_sd15.bin`` (plus) and
    ``image_encoder/`` at the top, ``sdxl_models/ip-adapter_sdxl.safetensors`` (plain, on the SDXL
    encoder next to it) and ``sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors`` (plus, on the top
    encoder's hidden states, as h94's vit-h SDXL adapters). Returns the files by name."""
    folder = store / "ipadapter"
    for i, (name, (hidden, proj)) in enumerate(ENCODERS.items()):
        save_encoder(folder / name, hidden, proj, seed=40 + i)
    g = torch.Generator().manual_seed(7)
    sd1, sdxl = unets["sd1"], unets["sdxl"]
    h1, p1 = ENCODERS["image_encoder"]
    hx, px = ENCODERS["sdxl_models/image_encoder"]
    c1, cx = int(sd1.config.cross_attention_dim), int(sdxl.config.cross_attention_dim)
    files = {
        "ip-adapter_sd15": (folder / "ip-adapter_sd15.safetensors", plain_proj(p1, c1, g), sd1),
        "ip-adapter-plus_sd15": (folder / "ip-adapter-plus_sd15.bin", plus_proj(h1, c1, g), sd1),
        "ip-adapter_sdxl": (folder / "sdxl_models/ip-adapter_sdxl.safetensors", plain_proj(px, cx, g), sdxl),
        "ip-adapter-plus_sdxl_vit-h": (
            folder / "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
            plus_proj(h1, cx, g, dim=40, heads=2),
            sdxl,
        ),
    }
    return {name: save_adapter(path, proj, ip_layers(unet, g)) for name, (path, proj, unet) in files.items()}


_STORE: dict[str, Any] = {}


def ip_store() -> tuple[Path, dict[str, Path]]:
    """A store with the tiny ``sd1`` and ``sdxl`` models, :func:`add_ip_adapters`'s files and one SD1
    ControlNet (``cn_a``), built once per test process (removed at exit); and the adapter files."""
    import atexit
    import shutil
    import tempfile

    from service.models.store import ModelStore
    from tests.support.controlnet_tiny import make_controlnet, save_folder
    from tests.support.sd_tiny import save_diffusers, write_manifest

    if "root" not in _STORE:
        root = Path(tempfile.mkdtemp(prefix="tiny-ip-store-"))
        atexit.register(shutil.rmtree, root, True)
        save_diffusers(root / "sd1")
        save_diffusers(root / "sdxl", sdxl=True)
        unets = {}
        for name in ("sd1", "sdxl"):
            write_manifest(root / name)
            unets[name] = ModelStore(root).load(name).text_model.unet  # type: ignore[attr-defined]
        save_folder(make_controlnet(seed=1), root / "controlnet" / "cn_a")
        _STORE["root"], _STORE["files"] = root, add_ip_adapters(root, unets)
    return _STORE["root"], _STORE["files"]
