"""Flux ControlNet units per request, per row, in shared transformer calls.

As for SD (units.py), a request's units ride in its conditioning rows, so rows with different Flux
ControlNets, different control images or none share each transformer call. Every row of a Flux
model whose store has ControlNets carries:

- :data:`LATENT` ``[rows, MAX_UNITS, tokens, in_channels]``: each unit's control image as the
  ControlNet takes it, computed once when the job is built: the VAE's latents (the posterior mean,
  shifted and scaled) packed in 2x2 patches as diffusers' FluxControlNetPipeline does; XLabs-style
  ControlNets' own image embedding (it depends on the image only);
- :data:`REGION` ``[rows, MAX_UNITS, tokens]``: each unit's mask (effective region) as the share of
  each token's pixels inside it (1 without a mask);
- :data:`~service.models.controlnet.units.UNIT` ``[rows, MAX_UNITS, 7]``: the SD table's columns
  (ControlNet id, weight, guidance_start, guidance_end, the union control mode or -1, and the
  timestep window bound by :meth:`ControlSet.bind_schedule` on ``1000 t``).

:meth:`FluxControlSet.residuals` runs, per ControlNet used by an active row, ONE call over all its
(row, unit) pairs, scales each pair's residuals by its weight (diffusers' ``conditioning_scale``)
and sums them per row and per transformer block (each ControlNet's residuals mapped onto the
transformer's blocks by its own interval: :func:`flux.per_block`), which is what diffusers'
FluxMultiControlNetModel sums for several ControlNets. Rows without an active unit add zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from service.sampling.errors import InputError

from . import files
from .flux import FluxControlNet, load_flux, per_block, read_config
from .net import ControlNetConfig, ControlNetConfigError
from .units import MAX_UNITS, UNIT, ControlSet

LATENT, REGION = "control_latent", "control_region"
# InstantX / Shakker-Labs FLUX.1-dev ControlNet-Union (-Pro): the model cards' control modes
UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")
# other names by meaning: A1111's union_control_type ("OpenPose", "Hard Edge": canny / lineart / mlsd)
# and ComfyUI's SetUnionControlNetType (which passes its list's index to the model: not followed here)
UNION_ALIASES = {
    "openpose": "pose",
    "low_quality": "lq",
    "grayscale": "gray",
    "hard_edge": "canny",
    "canny/lineart/anime_lineart/mlsd": "canny",
}


def t_scale(sigmas: Tensor) -> Tensor:
    """The flow time as the unit windows compare it: 1000 t (so bind_schedule's margins stay far
    below the spacing of the steps)."""
    return sigmas * 1000


@dataclass
class FluxUnit:
    net: int
    weight: float
    start: float
    end: float
    mode: int  # union control mode, -1: none
    tokens: Tensor  # [tokens, in_channels]
    region: Tensor | None = None  # [tokens] in [0, 1]: the effective region (None: everywhere)


def _sd_family(info: files.ControlNetFile) -> str:
    """What an SD ControlNet is for, from its folder's config (single files: UNet ControlNets)."""
    if info.path.is_dir():
        try:
            return files.family(ControlNetConfig.from_dict(read_config(info.path)))
        except (OSError, ValueError):
            pass
    return "Stable Diffusion (a UNet ControlNet)"


class FluxControlSet(ControlSet):
    """The Flux ControlNets one loaded Flux model uses (ids are stable, as ControlSet's)."""

    def __init__(
        self,
        root: Path,
        transformer: Any,
        encode: Callable[[Tensor], Tensor],
        device: torch.device,
        dtype: torch.dtype,
        model: str,
        default_guidance: float,
        reserve: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(root, transformer.config, device, dtype, model, reserve)
        self.encode = encode  # images [B, 3, H, W] in [-1, 1] -> the model's latents
        self.doubles = len(transformer.transformer_blocks)
        self.singles = len(transformer.single_transformer_blocks)
        self.default_guidance = float(default_guidance)
        self.nets: list[FluxControlNet] = []  # type: ignore[assignment]

    def _check_kind(self, info: files.ControlNetFile, field: str, known: list[str]) -> None:
        if files.kind(info) != "flux":
            raise InputError(
                f"{field}.model",
                f"ControlNet {info.name!r} is for {_sd_family(info)}, but model {self.model!r} is Flux",
                known,
            )

    def _build(self, info: files.ControlNetFile) -> FluxControlNet:
        try:
            axes = tuple(int(a) for a in self.unet_config.axes_dims_rope)
            return load_flux(info.path, self.device, self.dtype, axes)
        except (ControlNetConfigError, OSError, RuntimeError, ValueError, KeyError, SafetensorError) as exc:
            raise files.ControlNetError(f"ControlNet {info.name!r} could not be loaded: {exc}") from exc

    def _check_base(self, net: Any, name: str, field: str) -> None:
        t, c = self.unet_config, net.cfg
        inner = int(t.num_attention_heads) * int(t.attention_head_dim)
        if c.inner_dim != inner or int(c.joint_attention_dim) != int(t.joint_attention_dim):
            raise InputError(
                f"{field}.model",
                f"Flux ControlNet {name!r} has width {c.inner_dim} and text width {c.joint_attention_dim}, "
                f"but model {self.model!r} has {inner} and {t.joint_attention_dim}",
            )

    # --- building a request's rows ---
    def prepare_flux(
        self, units: list[Any], height: int, width: int, grid: tuple[int, int]
    ) -> list[FluxUnit]:
        """A request's units: ControlSet.prepare's checks, ControlNet and control image, then each
        image as its ControlNet's input tokens, a union ControlNet's control mode, and a mask as the
        share of each token's pixels in the effective region (``grid``: the tokens' rows, columns)."""
        for i, unit in enumerate(units):  # what Flux units do not take, before any image is read
            if getattr(unit, "images", None):  # a union unit's more images (SDXL ControlNet-Union)
                raise InputError(
                    f"controlnets[{i}].images",
                    "Flux union ControlNets take one image per unit: use more units",
                )
        out: list[FluxUnit] = []
        for i, (unit, p) in enumerate(zip(units, self.prepare(units, height, width), strict=True)):
            field = f"controlnets[{i}]"
            if (
                p.mode != 0
            ):  # soft and CFG-side injection act on a UNet's skips and uncond rows: Flux has neither
                raise InputError(
                    f"{field}.control_mode", "Flux ControlNets take control_mode Balanced only", ["Balanced"]
                )
            net = self.nets[p.net]
            mode = self._mode(net, getattr(unit, "control_type", None), field)
            region = None
            if bool((p.hint[3] != 255).any()):  # A1111's effective region, at the tokens' resolution
                mask = p.hint[3][None, None].float() / 255
                region = torch.nn.functional.interpolate(mask, size=grid, mode="area").flatten()
            tokens = self._tokens(net, p.hint[:3], field)
            out.append(FluxUnit(p.net, p.weight, p.start, p.end, mode, tokens, region))
        return out

    @staticmethod
    def _mode(net: FluxControlNet, value: Any, field: str) -> int:
        """A union ControlNet's control mode (a model card name or its index; these have no "auto"),
        -1 for other ControlNets."""
        if not net.union:  # read for union models only, as sd-webui-controlnet does ("Unknown" by default)
            return -1
        count = int(net.cfg.num_mode or 0)
        names = UNION_MODES[:count]  # the model cards name the first seven of the config's num_mode
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
            return value
        if isinstance(value, str):
            low = value.strip().lower().replace(" ", "_")
            low = UNION_ALIASES.get(low, low)
            if low in names:
                return names.index(low)
            if low.isdigit() and int(low) < count:
                return int(low)
        raise InputError(
            f"{field}.control_type",
            f"a union Flux ControlNet needs control_type, one of {list(names)} (or 0-{count - 1}); "
            f"got {value!r}",
            list(names),
        )

    @torch.inference_mode()
    def _tokens(self, net: FluxControlNet, rgb: Tensor, field: str) -> Tensor:
        """The control image (uint8 RGB at the generation size) as the ControlNet's input tokens."""
        from service.models.flow_nets import pack

        image = (rgb.float() / 255 * 2 - 1)[None]
        if net.input_hint_block is not None:
            tokens = net.cond_tokens(image.to(self.device, self.dtype))[0]
        else:
            tokens = pack(self.encode(image))[0]
        if tokens.shape[-1] != int(net.cfg.in_channels):
            raise InputError(
                f"{field}.model",
                f"this Flux ControlNet takes {net.cfg.in_channels} channels per token, the model's "
                f"control image gives {tokens.shape[-1]}",
            )
        return tokens.to(self.device, self.dtype)

    def flux_rows(self, units: list[FluxUnit], n: int, token_shape: tuple[int, int]) -> dict[str, Tensor]:
        latent = torch.zeros(MAX_UNITS, *token_shape, dtype=self.dtype, device=self.device)
        region = torch.ones(MAX_UNITS, token_shape[0], dtype=self.dtype, device=self.device)
        inf = float("inf")
        table = torch.tensor([[-1.0, 0.0, 0.0, 1.0, -1.0, -inf, inf]] * MAX_UNITS)
        for i, u in enumerate(units):
            if tuple(u.tokens.shape) != token_shape:
                raise InputError(
                    f"controlnets[{i}].model",
                    f"the ControlNet's control tokens {tuple(u.tokens.shape)} do not fit the latents' "
                    f"{token_shape}",
                )
            latent[i] = u.tokens
            if u.region is not None:
                region[i] = u.region
            table[i, :5] = torch.tensor([float(u.net), u.weight, u.start, u.end, float(u.mode)])
        return {
            LATENT: latent.expand(n, -1, -1, -1).clone(),
            REGION: region.expand(n, -1, -1).clone(),
            UNIT: table.expand(n, -1, -1).clone(),
        }

    # --- the transformer call ---
    def active(self, t: Tensor, unit: Tensor) -> Tensor:
        """[rows, MAX_UNITS]: the units acting at each row's time ``t`` (flow time, [rows])."""
        tt = t_scale(t.reshape(-1).float().to(unit.device))[:, None]
        return (unit[..., 0] >= 0) & (unit[..., 1] != 0) & (tt > unit[..., 5]) & (tt <= unit[..., 6])

    def residuals(  # type: ignore[override]
        self, kw: dict[str, Any], latent: Tensor, unit: Tensor, region: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor] | None] | None:
        """Per transformer block, each row's summed ControlNet residuals (double blocks, single
        blocks or None), or None when no row has an active unit. ``kw``: the transformer's inputs;
        ``region``: each unit's effective region per token (``REGION``)."""
        x, t = kw["hidden_states"], kw["timestep"]
        active = self.active(t, unit)
        if not bool(active.any()):
            return None
        ids = unit[..., 0]
        b = x.shape[0]
        placed: list[tuple[list[Tensor], list[Tensor]]] = []  # per net: the per-block lists
        for net_id in sorted({int(v) for v in ids[active].tolist()}):
            rows, slots = torch.nonzero(active & (ids == net_id), as_tuple=True)
            net = self.nets[net_id]
            rows_d = rows.to(x.device)
            guidance = kw.get("guidance")
            if net.cfg.guidance_embeds and guidance is None:
                guidance = torch.full([b], self.default_guidance, device=x.device)
            doubles, singles = net(
                x[rows_d],
                latent[rows, slots].to(x.device, x.dtype),
                t.reshape(-1).expand(b)[rows_d],
                kw["encoder_hidden_states"][rows_d],
                kw["pooled_projections"][rows_d],
                None if guidance is None else guidance[rows_d],
                unit[rows, slots, 4].long().to(x.device) if net.union else None,
                kw["txt_ids"],
                kw["img_ids"],
            )
            weight = unit[rows, slots, 1].to(x.device, x.dtype).view(-1, 1, 1)
            if region is not None:
                part = region[rows, slots].to(x.device, x.dtype)
                if not bool((part == 1).all()):  # masked units: each token's share of the region
                    weight = weight * part[:, :, None]

            def place(
                samples: list[Tensor], rows_d: Tensor = rows_d, weight: Tensor = weight
            ) -> list[Tensor]:
                return [s.new_zeros(b, *s.shape[1:]).index_add(0, rows_d, s * weight) for s in samples]

            # each ControlNet's residuals once, then mapped onto the blocks (shared references, no copies)
            placed.append(
                (
                    per_block(place(doubles), self.doubles, net.repeat),
                    per_block(place(singles), self.singles, False),
                )
            )
        return _sum_blocks([p[0] for p in placed]), _sum_blocks([p[1] for p in placed]) or None


def _sum_blocks(per_net: list[list[Tensor]]) -> list[Tensor]:
    """Per block, the sum over ControlNets (those with residuals there); equal sums computed once."""
    lists = [p for p in per_net if p]
    if len(lists) <= 1:
        return lists[0] if lists else []
    out: list[Tensor] = []
    memo: dict[tuple[int, ...], Tensor] = {}
    for parts in zip(*lists, strict=True):
        key = tuple(id(p) for p in parts)
        if key not in memo:
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            memo[key] = total
        out.append(memo[key])
    return out
