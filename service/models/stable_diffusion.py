"""Stable Diffusion (1.x, 2.x eps/v, SDXL base) for the sampling core and the engine.

``StableDiffusion`` holds the loaded components and turns requests into what the engine runs:
conditioning dicts (one row per image; cond and uncond rows built separately), the latent shape
for a size, the img2img start latents and the inpainting mask or masked-image conditioning.
``load_stable_diffusion`` is the model store's loader for manifest kind "stable_diffusion"; it
registers itself when this module is imported (the store imports it on demand).

Conditioning keys the denoiser takes: ``context`` [B, L, D]; SDXL also ``y`` [B, P] (pooled text)
and ``time_ids`` [B, 6]; 9-channel inpainting UNets also ``c_concat`` [B, 5, h, w].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.models.sd_loader import (
    SDComponents,
    SDLoadError,
    check_consistency,
    load_diffusers,
    load_single_file,
)
from service.models.sd_text import Encoded, PromptEncoder
from service.models.sd_unet import make_denoiser
from service.models.store import LoadedModel, Manifest, register_loader
from service.sampling.errors import InputError

SDInputError = InputError  # a request that does not fit the model; ``field`` names the request field


@dataclass
class SDJobInputs:
    """Everything a Stable Diffusion job adds to an engine JobRequest."""

    cond: dict[str, Tensor]  # n rows
    uncond: dict[str, Tensor] | None  # n rows; None when unguided (cfg_scale == 1)
    latent_shape: tuple[int, int, int]
    image_size: tuple[int, int]  # (height, width)
    init: Tensor | None = None  # [n, C, h, w] clean latents (img2img start; blend target)
    mask: Tensor | None = None  # [1, 1, h, w] in [0, 1], 1 = repaint; latent blend for ordinary UNets


class StableDiffusion:
    def __init__(
        self,
        c: SDComponents,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        prediction_type: str | None = None,
        clip_skip: int = 1,
        quantize: bool = False,
        cache_size: int = 128,
        max_size: int = 2048,
        vae_dtype: torch.dtype | None = None,
        where: str = "",
    ) -> None:
        check_consistency(c, where or "model")
        self.device = torch.device(device)
        self.dtype = dtype
        self.components = c
        self.is_sdxl = c.is_sdxl
        self.max_size = int(max_size)
        self.unet: Any = c.unet.to(self.device, dtype).eval()
        self.vae_dtype = vae_dtype or (torch.float32 if dtype == torch.float16 else dtype)
        self.vae: Any = c.vae.to(self.device, self.vae_dtype).eval()
        for enc in c.text_encoders:
            enc.to(self.device, dtype).eval()
        self.denoiser = make_denoiser(self.unet, c.scheduler_config, prediction_type, quantize).to(
            self.device
        )
        self.prediction_type = (
            "v_prediction" if type(self.denoiser).__name__ == "DiscreteVDenoiser" else "epsilon"
        )
        self.text = PromptEncoder(
            c.tokenizers,
            c.text_encoders,
            sdxl=self.is_sdxl,
            clip_skip=clip_skip,
            cache_size=cache_size,
            device=self.device,
        )
        self.force_zeros = self.is_sdxl and bool(c.model_index.get("force_zeros_for_empty_prompt", True))
        vcfg: Any = c.vae.config
        self.latent_channels = int(vcfg.latent_channels)
        self.vae_scale = 2 ** (len(vcfg.block_out_channels) - 1)
        self.scaling_factor = float(vcfg.scaling_factor)
        self.shift_factor = float(getattr(vcfg, "shift_factor", None) or 0.0)
        self.inpainting = int(c.unet.config.in_channels) == 2 * self.latent_channels + 1
        self.default_size = int(c.unet.config.sample_size) * self.vae_scale

    # --- sizes ---
    def check_size(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent shape for an image size, or SDInputError naming width/height."""
        for field, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or v % 8 or v % self.vae_scale or v <= 0:
                raise SDInputError(
                    field, f"{field} must be a positive multiple of {max(8, self.vae_scale)}, got {v}"
                )
            if v > self.max_size:
                raise SDInputError(
                    field, f"{field} must be at most {self.max_size}, got {v}", [8, self.max_size]
                )
        return (self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    # --- text ---
    def text_conditioning(
        self,
        prompt: str,
        negative_prompt: str | None,
        n: int,
        height: int,
        width: int,
        guided: bool,
        clip_skip: int | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """cond (and uncond when guided) rows for n images of one prompt."""
        pos = self.text.encode(prompt, clip_skip)
        neg: Encoded | None = None
        if guided:
            if self.force_zeros and negative_prompt is None:
                neg = self.text.zeros_like(pos)
            else:
                neg = self.text.encode(negative_prompt or "", clip_skip)
            chunks = max(pos.chunks, neg.chunks)
            pos, neg = self.text.pad_to(pos, chunks, clip_skip), self.text.pad_to(neg, chunks, clip_skip)
        return self._rows(pos, n, height, width), (None if neg is None else self._rows(neg, n, height, width))

    def _rows(self, enc: Encoded, n: int, height: int, width: int) -> dict[str, Tensor]:
        d = {"context": enc.context.expand(n, -1, -1).clone()}
        if self.is_sdxl:
            assert enc.pooled is not None
            d["y"] = enc.pooled.expand(n, -1).clone()
            ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=self.device)
            d["time_ids"] = ids.expand(n, -1).clone()
        return d

    # --- VAE ---
    @torch.inference_mode()
    def encode_image(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (the posterior mean, scaled)."""
        x = images.to(self.device, self.vae_dtype)
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(self.dtype)

    @torch.inference_mode()
    def decode(self, latents: Tensor, chunk: int = 8) -> Tensor:
        """Latents -> images in [-1, 1], ``chunk`` images per VAE call."""
        outs = []
        for part in latents.split(chunk):
            z = part.to(self.device, self.vae_dtype) / self.scaling_factor + self.shift_factor
            outs.append(self.vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(outs)

    # --- images ---
    def _image(self, image: Tensor, height: int, width: int) -> Tensor:
        if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[:2] != (1, 3):
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise SDInputError("init_image", f"init_image must be one RGB image [1, 3, H, W]; got {got}")
        if not torch.isfinite(image).all() or image.min() < -1.001 or image.max() > 1.001:
            raise SDInputError("init_image", "init_image values must be in [-1, 1]")
        if tuple(image.shape[-2:]) != (height, width):
            image = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False)
        return image.clamp(-1, 1)

    def _mask(self, mask: Tensor, image_hw: tuple[int, int], height: int, width: int) -> Tensor:
        if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[:2] != (1, 1):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise SDInputError("mask", f"mask must be one grayscale image [1, 1, H, W]; got {got}")
        if tuple(mask.shape[-2:]) != image_hw:
            mh, mw = mask.shape[-2:]
            raise SDInputError(
                "mask", f"mask is {mw}x{mh} but init_image is {image_hw[1]}x{image_hw[0]}; they must match"
            )
        mask = mask.float().clamp(0, 1)
        if tuple(mask.shape[-2:]) != (height, width):
            mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        return mask

    def job_inputs(
        self,
        prompt: str | None,
        negative_prompt: str | None = None,
        *,
        n: int = 1,
        cfg_scale: float = 7.0,
        width: int | None = None,
        height: int | None = None,
        init_image: Tensor | None = None,
        mask: Tensor | None = None,
        clip_skip: int | None = None,
    ) -> SDJobInputs:
        """Check and encode one request.

        ``init_image``: [1, 3, H, W] in [-1, 1] at its own size; ``mask``: [1, 1, H, W] in [0, 1] (1 =
        repaint), the init image's size. Width and height default to the init image's (floored to a
        multiple of 8), else the model's native size.
        """
        if mask is not None and init_image is None:
            raise SDInputError("mask", "mask needs an init_image")
        if init_image is not None and isinstance(init_image, Tensor) and init_image.ndim == 4:
            ih, iw = int(init_image.shape[-2]), int(init_image.shape[-1])
            height = height or ih - ih % max(8, self.vae_scale)
            width = width or iw - iw % max(8, self.vae_scale)
        height, width = height or self.default_size, width or self.default_size
        shape = self.check_size(height, width)
        guided = cfg_scale != 1.0
        cond, uncond = self.text_conditioning(
            prompt or "", negative_prompt, n, height, width, guided, clip_skip
        )
        out = SDJobInputs(cond, uncond, shape, (height, width))
        if init_image is None:
            if self.inpainting:  # no image: an inpainting UNet repaints everything
                self._add_concat(out, torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width), n)
            return out
        image_hw = (
            (int(init_image.shape[-2]), int(init_image.shape[-1]))
            if isinstance(init_image, Tensor)
            else (0, 0)
        )
        image = self._image(init_image, height, width)
        pixel_mask = None if mask is None else self._mask(mask, image_hw, height, width)
        latents = self.encode_image(image)
        out.init = latents.expand(n, -1, -1, -1).clone()
        if self.inpainting:
            self._add_concat(
                out, image, torch.ones(1, 1, height, width) if pixel_mask is None else pixel_mask, n
            )
        elif pixel_mask is not None:
            out.mask = F.interpolate(pixel_mask, size=shape[-2:], mode="area").to(self.device, self.dtype)
        return out

    def _add_concat(self, out: SDJobInputs, image: Tensor, pixel_mask: Tensor, n: int) -> None:
        """9-channel UNets: [binary mask at latent size, latents of the image with the masked part zeroed]."""
        binary = (pixel_mask >= 0.5).float()
        masked = self.encode_image(image.to(binary.device) * (1 - binary))
        small = F.interpolate(binary, size=out.latent_shape[-2:]).to(self.device, self.dtype)
        concat = torch.cat([small, masked], dim=1).expand(n, -1, -1, -1).clone()
        out.cond["c_concat"] = concat
        if out.uncond is not None:
            out.uncond["c_concat"] = concat.clone()


def _dtype(name: Any, what: str) -> torch.dtype | None:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name is None:
        return None
    if name not in table:
        raise SDLoadError(f"manifest field {what} must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def load_components(manifest: Manifest) -> SDComponents:
    """Read the manifest's layout: a diffusers folder, or one original-layout checkpoint + config folder."""
    raw = manifest.raw
    allow_pickle = raw.get("allow_pickle", False) is True
    weights = manifest.file("weights", ".")
    folder = manifest.folder.resolve()
    if weights.is_dir():
        return load_diffusers(weights, variant=raw.get("variant"), allow_pickle=allow_pickle)
    cfg = manifest.file("config", "config")
    if not cfg.is_dir():
        raise SDLoadError(
            f"{manifest.name}: a single-file checkpoint needs a diffusers-layout config folder; "
            f"missing {cfg.relative_to(folder) if cfg.is_relative_to(folder) else cfg}"
        )
    return load_single_file(Path(weights), cfg, folder, allow_pickle=allow_pickle)


def load_model(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    raw = manifest.raw
    dtype = _dtype(raw.get("dtype"), "dtype") or dtype
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 convolutions are slow or missing on CPU
    c = load_components(manifest)
    try:
        return StableDiffusion(
            c,
            device,
            dtype,
            prediction_type=raw.get("prediction_type"),
            clip_skip=int(raw.get("clip_skip", 1)),
            quantize=bool(raw.get("quantize", False)),
            cache_size=int(raw.get("prompt_cache_size", 128)),
            max_size=int(raw.get("max_size", 2048)),
            vae_dtype=_dtype(raw.get("vae_dtype"), "vae_dtype"),
            where=f"{manifest.name} ({manifest.folder})",
        )
    except ValueError as exc:
        raise SDLoadError(f"{manifest.name}: {exc}") from exc


@dataclass
class SDLoadedModel(LoadedModel):
    """The store's LoadedModel plus the Stable Diffusion object (``sd``) the API builds jobs with."""

    sd: StableDiffusion | None = None


def load_stable_diffusion(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> SDLoadedModel:
    """The model store's loader for kind "stable_diffusion"."""
    sd = load_model(manifest, device, dtype)
    d = manifest.defaults
    h = int(d.get("height", sd.default_size))
    w = int(d.get("width", sd.default_size))
    shape = sd.check_size(h, w)
    return SDLoadedModel(
        manifest=manifest,
        denoiser=sd.denoiser,
        latent_shape=shape,
        image_size=(h, w),
        image_channels=3,
        device=sd.device,
        dtype=sd.dtype,
        conditioning="text",
        decode=sd.decode,
        encode=sd.encode_image,
        info={
            "family": "sdxl" if sd.is_sdxl else "sd",
            "prediction_type": sd.prediction_type,
            "inpainting": sd.inpainting,
            "source": sd.components.source,
            "max_size": sd.max_size,
            "sigma_min": sd.denoiser.sigma_min,
            "sigma_max": sd.denoiser.sigma_max,
        },
        sd=sd,
    )


register_loader("stable_diffusion", load_stable_diffusion)
