"""Tiny random ControlNet-Union models (diffusers' ``ControlNetUnionModel``, xinsir's
controlnet-union-sdxl-1.0 layout: 6 control types; ProMax: 8) for ``sd_tiny``'s SDXL UNet, saved as
diffusers folders (``config.json`` with ``"_class_name": "ControlNetUnionModel"`` +
``diffusion_pytorch_model.safetensors``). diffusers zero-initialises the zero convolutions and
``spatial_ch_projs`` and draws the task embeddings; every such tensor gets small random values here so
each part of the network changes the residuals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from service.models.controlnet.union import Items
from tests.support.sd_tiny import diffusers_pipeline, save_diffusers, sdxl_added_conditioning, write_manifest

ZEROED = (
    "controlnet_down_blocks",
    "controlnet_mid_block",
    "controlnet_cond_embedding.conv_out",
    "spatial_ch_projs",
)


def make_union(seed: int = 0, types: int = 8, **over: Any) -> Any:
    """A diffusers ControlNetUnionModel for ``sd_tiny``'s SDXL UNet (context 80, text_time, pooled 48)."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    kw: dict[str, Any] = {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 80,
        "attention_head_dim": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "conditioning_embedding_out_channels": (8, 8, 16, 16),
        "num_control_type": types,
        "num_trans_channel": 16,
        "num_trans_head": 2,
        "num_trans_layer": 1,
        "num_proj_channel": 16,
        **sdxl_added_conditioning(48),
        **over,
    }
    net = ControlNetUnionModel(**kw).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(ZEROED):
                p.copy_(torch.randn_like(p) * 0.2)
            elif name == "task_embedding":
                p.copy_(torch.randn_like(p))
    return net


def add_unions(store: Path) -> dict[str, Any]:
    """``union_xl`` (6 types, as controlnet-union-sdxl-1.0) and ``union_promax`` (8 types) in
    ``store/controlnet/``; returns the diffusers networks by name (the test oracles)."""
    nets = {"union_xl": make_union(seed=5, types=6), "union_promax": make_union(seed=6, types=8)}
    for name, net in nets.items():
        net.save_pretrained(str(store / "controlnet" / name), safe_serialization=True)
    return nets


def union_store(root: Path, sd1: bool = True) -> dict[str, Any]:
    """A store with the tiny ``sdxl`` model (and ``sd1``) and :func:`add_unions`' union ControlNets."""
    for name, kw in (("sd1", {}), ("sdxl", {"sdxl": True}))[0 if sd1 else 1 :]:
        save_diffusers(root / name, **kw)
        write_manifest(root / name)
    return add_unions(root)


def union_reference(
    sd: Any, net: Any, scheduler: Any, noise: torch.Tensor, unit: dict[str, Any], **kw: Any
) -> Any:
    """diffusers' StableDiffusionXLControlNetUnionPipeline on a loaded tiny SDXL model: "a red cat",
    negative "the dog", 64x64, the ``noise`` latents; ``unit``: control_image, control_mode,
    controlnet_conditioning_scale; ``kw``: num_inference_steps, guidance_scale, output_type."""
    with torch.inference_mode():
        pipe = diffusers_pipeline(sd, scheduler, net)
        out = pipe(
            "a red cat", negative_prompt="the dog", height=64, width=64, latents=noise.clone(), **unit, **kw
        )
    return out.images


def union_gap(ours: Any, ref: Any, modes: list[int], scale: float = 0.7, batch: int = 1) -> float:
    """The largest difference between our union network's residuals and diffusers' on random inputs
    (``batch`` copies of one row, as the pipeline's CFG pair; one image per entry of ``modes``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g).expand(batch, -1, -1, -1)
    images = [torch.rand(1, 3, 64, 64, generator=g).expand(batch, -1, -1, -1) for _ in modes]
    ctx = torch.randn(batch, 7, 80, generator=g)
    y = torch.randn(1, 48, generator=g).expand(batch, -1)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)
    t = torch.tensor([700.0])
    types = torch.zeros(ref.config.num_control_type).scatter_(0, torch.tensor(modes), 1)
    with torch.no_grad():
        down, mid = ref(
            x,
            t,
            ctx,
            images,
            types.expand(batch, -1),
            modes,
            conditioning_scale=scale,
            added_cond_kwargs={"text_embeds": y, "time_ids": time_ids},
            return_dict=False,
        )
        n = len(modes)
        owner, kinds = torch.arange(batch).repeat(n), torch.tensor(modes).repeat_interleave(batch)
        items = Items(torch.cat(images), owner, kinds, torch.full((batch,), scale))
        got = ours.union(x, t.expand(batch), ctx, items, y=y, time_ids=time_ids)
    want = [*down, mid]
    assert len(got) == len(want)
    return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
