"""Random LoRA files for tests, in kohya/A1111 and diffusers/PEFT layouts, for any module tree."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

Select = Callable[[str, nn.Module], bool]


def attention_and_convs(name: str, module: nn.Module) -> bool:
    """Attention / feed-forward linears, transformer proj_in/out and resnet convs (UNet); CLIP's
    attention and MLP layers (text encoder)."""
    keys = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net", "q_proj", "k_proj",
            "v_proj", "out_proj", "fc1", "fc2", "conv1", "conv2")  # fmt: skip
    return isinstance(module, nn.Linear | nn.Conv2d) and name.endswith(keys)


def every_layer(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def random_layers(
    root: nn.Module, rank: int, seed: int, select: Select = attention_and_convs, std: float = 0.2
) -> dict[str, tuple[Tensor, Tensor]]:
    """(down, up) per selected layer name; conv LoRAs take the layer's kernel for down, 1x1 for up."""
    g = torch.Generator().manual_seed(seed)
    return {name: random_pair(m, rank, g, std) for name, m in root.named_modules() if select(name, m)}


def kohya_state(parts: dict[str, dict[str, tuple[Tensor, Tensor]]], alpha: float | None) -> dict[str, Tensor]:
    """kohya / A1111 keys: lora_unet_ / lora_te_ + the module path with underscores."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for comp, layers in parts.items():
        for name, (down, up) in layers.items():
            key = prefix[comp] + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def peft_state(parts: dict[str, dict[str, tuple[Tensor, Tensor]]]) -> dict[str, Tensor]:
    """diffusers / PEFT keys: unet. / text_encoder. + the dotted module path + lora_A / lora_B."""
    out = {}
    for comp, layers in parts.items():
        for name, (down, up) in layers.items():
            out[f"{comp}.{name}.lora_A.weight"] = down.contiguous()
            out[f"{comp}.{name}.lora_B.weight"] = up.contiguous()
    return out


def save(state: dict[str, Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# Files with the key names real tools write (kohya sd-scripts networks/lora.py, diffusers, PEFT).
#
# kohya's LoRANetwork walks ``root.named_modules()``, and for every module whose class is a target
# (UNet: Transformer2DModel; with conv_dim / LoCon also ResnetBlock2D, Downsample2D, Upsample2D; CLIP:
# CLIPAttention, CLIPMLP) adds each Linear / Conv2d child: ``prefix + "." + name + "." + child`` with
# every "." made "_". SD1/SD2 are trained on a UNet laid out as diffusers' (so the names are
# diffusers' paths); SDXL on the original SGM UNet (input_blocks / middle_block / output_blocks, a
# ResBlock's in_layers.2 / emb_layers.1 / out_layers.3 / skip_connection, a Downsample's op). The
# text encoder's names come from transformers 4's CLIPTextModel, which has a text_model level.

KOHYA_ATTENTION = ("Transformer2DModel",)
KOHYA_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TEXT = ("CLIPAttention", "CLIPMLP")


def kohya_targets(root: nn.Module, classes: tuple[str, ...]) -> dict[str, nn.Module]:
    """Dotted path -> Linear / Conv2d of the children of every module whose class kohya targets."""
    out: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if type(module).__name__ in classes:
            for child, m in module.named_modules():
                if isinstance(m, nn.Linear | nn.Conv2d):
                    out[f"{name}.{child}"] = m
    return out


def with_text_model(path: str) -> str:
    """A CLIP layer path as transformers 4 lays CLIPTextModel out (and as real files name it)."""
    return path if path.startswith("text_model.") else "text_model." + path


SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}  # fmt: skip


def sgm_path(path: str, unet: nn.Module) -> str:
    """The original (SGM / LDM) UNet path of a diffusers UNet2DConditionModel layer path, from the
    block structure of openaimodel.UNetModel: input_blocks = [conv_in] + per level, per layer
    [ResBlock, (SpatialTransformer)] + a [Downsample] between levels; middle_block = [ResBlock,
    SpatialTransformer, ResBlock]; output_blocks = per level, per layer (layers_per_block + 1)
    [ResBlock, (SpatialTransformer), (Upsample on the level's last)]."""
    n = unet.config.layers_per_block  # type: ignore[union-attr]
    p = path.split(".")

    def inner(kind: str, rest: list[str]) -> str:
        return SGM_RESNET[rest[0]] if kind == "resnets" else ".".join(rest)

    if p[0] == "down_blocks":
        level, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return f"input_blocks.{1 + level * (n + 1) + n}.0.op"
        i = 1 + level * (n + 1) + int(p[3])
        return f"input_blocks.{i}.{0 if kind == 'resnets' else 1}.{inner(kind, p[4:])}"
    if p[0] == "mid_block":
        j = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
        return f"middle_block.{j}.{inner(p[1], p[3:])}"
    if p[0] == "up_blocks":
        level, kind = int(p[1]), p[2]
        block = unet.up_blocks[level]  # type: ignore[index]
        if kind == "upsamplers":
            after = 2 if getattr(block, "attentions", None) else 1
            return f"output_blocks.{level * (n + 1) + n}.{after}.conv"
        i = level * (n + 1) + int(p[3])
        return f"output_blocks.{i}.{0 if kind == 'resnets' else 1}.{inner(kind, p[4:])}"
    raise ValueError(f"not a block layer: {path}")


def random_pair(m: nn.Module, rank: int, g: torch.Generator, std: float = 0.2) -> tuple[Tensor, Tensor]:
    """(down, up) for one layer, in the shapes the layer's LoRA module has (conv: kxk down, 1x1 up)."""
    if isinstance(m, nn.Linear):
        down = torch.randn(rank, m.in_features, generator=g) * std / m.in_features**0.5
        return down, torch.randn(m.out_features, rank, generator=g) * std / rank**0.5
    assert isinstance(m, nn.Conv2d)
    kh, kw = m.kernel_size
    fan = m.in_channels * kh * kw
    down = torch.randn(rank, m.in_channels, kh, kw, generator=g) * std / fan**0.5
    return down, torch.randn(m.out_channels, rank, 1, 1, generator=g) * std / rank**0.5


def kohya_file(
    unet: nn.Module,
    text_encoders: list[nn.Module],
    seed: int,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    conv_rank: int | None = None,
    conv_alpha: float = 1.0,
    sgm: bool = False,
    std: float = 0.2,
) -> dict[str, Tensor]:
    """A kohya LoRA (LoCon when ``conv_rank``): ``lora_unet_`` / ``lora_te_`` (two encoders: ``lora_te1_``
    / ``lora_te2_``) keys with per-layer alphas, UNet names in the SGM layout when ``sgm``."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}

    def add(prefix: str, path: str, m: nn.Module, r: int, a: float) -> None:
        down, up = random_pair(m, r, g, std)
        key = prefix + path.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(a))

    prefixes = ["lora_te_"] if len(text_encoders) == 1 else ["lora_te1_", "lora_te2_"]
    for prefix, te in zip(prefixes, text_encoders, strict=False):
        for path, m in kohya_targets(te, KOHYA_TEXT).items():
            add(prefix, with_text_model(path), m, rank, alpha)
    classes = KOHYA_ATTENTION + (KOHYA_CONV if conv_rank else ())
    for path, m in kohya_targets(unet, classes).items():
        is_3x3 = isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        r, a = (conv_rank, conv_alpha) if is_3x3 and conv_rank else (rank, alpha)
        add("lora_unet_", sgm_path(path, unet) if sgm else path, m, r, a)
    return out


# diffusers' training scripts target these (train_text_to_image_lora: to_k/to_q/to_v/to_out.0; the
# text encoder: q/k/v/out_proj); fc1/fc2 and ff layers as later scripts and PEFT configs add them.
PEFT_UNET = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
PEFT_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def diffusers_file(
    unet: nn.Module, text_encoders: list[nn.Module], seed: int, layout: str, rank: int = 4, std: float = 0.2
) -> dict[str, Tensor]:
    """A diffusers-side LoRA: ``layout`` "peft" (``lora_A`` / ``lora_B``), "diffusers" (what
    ``save_lora_weights`` writes: ``unet.*.lora.down``, ``text_encoder.*.lora_linear_layer.down``) or
    "old" (attention processors: ``attn1.processor.to_q_lora.down``, text ``self_attn.to_q_lora.down``,
    MLP ``fc1.lora_linear_layer.down``); text paths with transformers 4's text_model level."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    old_names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora",
                 "q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora",
                 "out_proj": "to_out_lora"}  # fmt: skip
    comps = [("unet", unet, PEFT_UNET)]
    comps += [
        (n, te, PEFT_TEXT) for n, te in zip(("text_encoder", "text_encoder_2"), text_encoders, strict=False)
    ]
    for comp, root, targets in comps:
        text = comp != "unet"
        for path, m in root.named_modules():
            if not isinstance(m, nn.Linear | nn.Conv2d) or not path.endswith(targets):
                continue
            if (
                layout == "old"
                and not text
                and not any(path.endswith(t) for t in old_names if t.startswith("to_"))
            ):
                continue  # the processor format held attention projections only
            down, up = random_pair(m, rank, g, std)
            full = f"{comp}.{with_text_model(path) if text else path}"
            last = next(t for t in targets if path.endswith(t))
            if layout == "peft":
                a, b = f"{full}.lora_A.weight", f"{full}.lora_B.weight"
            elif layout == "diffusers":
                mid = "lora_linear_layer" if text else "lora"
                a, b = f"{full}.{mid}.down.weight", f"{full}.{mid}.up.weight"
            elif last in old_names:
                head = full[: -len(last) - 1]
                head = head.replace(".attn1", ".attn1.processor").replace(".attn2", ".attn2.processor")
                a, b = f"{head}.{old_names[last]}.down.weight", f"{head}.{old_names[last]}.up.weight"
            else:
                a, b = f"{full}.lora_linear_layer.down.weight", f"{full}.lora_linear_layer.up.weight"
            out[a], out[b] = down.contiguous(), up.contiguous()
    return out


def real_file(model: Any, layout: str, seed: int, std: float = 0.2) -> dict[str, Tensor]:
    """A LoRA for a loaded Stable Diffusion ``model`` in ``layout``: "kohya" (a LoCon on SD1/SD2; SGM
    UNet names and lora_te1_/lora_te2_ on SDXL), or diffusers_file's "peft", "diffusers", "old"."""
    sd = model.text_model
    unet, tes = sd.unet, sd.components.text_encoders
    if layout == "kohya":
        return kohya_file(unet, tes, seed, conv_rank=None if sd.is_sdxl else 2, sgm=sd.is_sdxl, std=std)
    return diffusers_file(unet, tes, seed, layout, std=std)


def reference_pipeline(model: Any, lora: Path | None, weight: float) -> Any:
    """diffusers' StableDiffusion(XL)Pipeline on copies of ``model``'s components, with ``lora`` loaded
    by diffusers' own ``load_lora_weights`` from the file and fused at ``weight``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    c = model.text_model.components
    kw: dict[str, Any] = {
        "vae": c.vae,
        "text_encoder": copy.deepcopy(c.text_encoders[0]),
        "tokenizer": c.tokenizers[0],
        "unet": copy.deepcopy(c.unet),
        "scheduler": EulerDiscreteScheduler.from_config(c.scheduler_config),
    }
    if model.text_model.is_sdxl:
        pipe: Any = StableDiffusionXLPipeline(
            text_encoder_2=copy.deepcopy(c.text_encoders[1]), tokenizer_2=c.tokenizers[1], **kw
        )
    else:
        pipe = StableDiffusionPipeline(
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw
        )
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
        names = ["unet", "text_encoder", "text_encoder_2"][: 1 + len(c.text_encoders)]
        pipe.fuse_lora(lora_scale=weight, components=names)
    return pipe


def euler_sigmas(model: Any, steps: int) -> list[float]:
    """The sigmas diffusers' EulerDiscreteScheduler runs for ``model`` at ``steps`` (requests send them
    as ``sigmas`` so the service and the reference pipeline take the same steps)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(model.text_model.components.scheduler_config)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas]
