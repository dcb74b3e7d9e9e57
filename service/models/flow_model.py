"""SD3 / SD3.5 and Flux for the sampling core and the engine (manifest kinds "sd3" and "flux").

:class:`FlowModel` mirrors :class:`~service.models.stable_diffusion.StableDiffusion`'s surface:
``job_inputs`` turns a request into conditioning rows (``context`` [B, L, D], ``pooled`` [B, P],
and Flux-dev's ``guidance`` [B]), the latent shape, img2img latents and the inpainting mask
(latent blend), raising SDInputError naming the request field; ``decode`` / ``encode_image``.
Its ``denoiser`` is a :class:`~service.sampling.flow.FlowDenoiser`: drivers see ``flow = True``
and run the flow forms of the samplers (service/sampling/flow.py).

CFG rows: SD3 uses classifier-free guidance (uncond rows when cfg_scale != 1); Flux does not
(schnell is distilled to few steps, dev takes the distilled ``guidance`` scale as an input), so
a negative prompt or cfg_scale != 1 on Flux is a 422.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.models.flow_loader import FlowComponents, load_flow_diffusers
from service.models.flow_nets import FluxVelocity, SD3Velocity
from service.models.flow_text import FlowPromptEncoder
from service.models.sd_loader import SDLoadError
from service.models.stable_diffusion import SDInputError, SDJobInputs, _dtype
from service.models.store import LoadedModel, Manifest, register_loader
from service.sampling.flow import FlowDenoiser, flux_shift


class FlowModel:
    def __init__(
        self,
        c: FlowComponents,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        shift: float | None = None,
        max_sequence_length: int | None = None,
        guidance: float = 3.5,
        cache_size: int = 128,
        max_size: int = 2048,
        vae_dtype: torch.dtype | None = None,
        default_size: int | None = None,
    ) -> None:
        self.components, self.family = c, c.family
        self.device, self.dtype = torch.device(device), dtype
        self.transformer: Any = c.transformer.to(self.device, dtype).eval()
        self.vae_dtype = vae_dtype or (torch.float32 if dtype == torch.float16 else dtype)
        self.vae: Any = c.vae.to(self.device, self.vae_dtype).eval()
        for enc in c.text_encoders.values():
            enc.to(self.device, dtype).eval()
        tcfg: Any = self.transformer.config
        vcfg: Any = c.vae.config
        sc = c.scheduler_config
        self.latent_channels = int(vcfg.latent_channels)
        self.vae_scale = 2 ** (len(vcfg.block_out_channels) - 1)
        self.scaling_factor = float(vcfg.scaling_factor)
        self.shift_factor = float(getattr(vcfg, "shift_factor", None) or 0.0)
        flux = self.family == "flux"
        self.multiple = self.vae_scale * (2 if flux else int(tcfg.patch_size))
        native = 1024 if flux else int(tcfg.sample_size) * self.vae_scale
        self.default_size = int(default_size or native)
        self.max_size = int(max_size)
        dynamic = None
        if sc.get("use_dynamic_shifting", False):
            keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
            dynamic = tuple(float(sc.get(k, d)) for k, d in zip(keys, (256, 4096, 0.5, 1.15), strict=True))
        base_shift = float(shift if shift is not None else sc.get("shift", 1.0))
        if dynamic is not None:  # range and table schedules at the default size's shift
            lat = self.default_size // self.vae_scale // 2
            seq, top, lo, hi = dynamic
            base_shift = flux_shift(lat * lat, int(seq), int(top), lo, hi)
        velocity = FluxVelocity(self.transformer) if flux else SD3Velocity(self.transformer)
        self.denoiser = FlowDenoiser(
            velocity,  # type: ignore[arg-type]
            shift=base_shift,
            ramp_end=None if flux else 0.0,
            dynamic=dynamic,  # type: ignore[arg-type]
        )
        self.denoiser.to(self.device)
        self.unet = None  # no LoRA support yet: service.models.lora attaches to a UNet
        self.uses_cfg = not flux
        self.takes_guidance = flux and bool(tcfg.guidance_embeds)
        self.default_guidance = float(guidance)
        self.text = FlowPromptEncoder(
            self.family,
            c.tokenizers,
            c.text_encoders,
            max_sequence_length=max_sequence_length or (512 if flux else 256),
            joint_dim=int(tcfg.joint_attention_dim),
            device=self.device,
            cache_size=cache_size,
        )

    # --- sizes ---
    def check_size(self, height: int, width: int) -> tuple[int, int, int]:
        for field, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % self.multiple:
                raise SDInputError(field, f"{field} must be a positive multiple of {self.multiple}, got {v}")
            if v > self.max_size:
                raise SDInputError(
                    field, f"{field} must be at most {self.max_size}, got {v}", [8, self.max_size]
                )
        return (self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    # --- VAE ---
    @torch.inference_mode()
    def encode_image(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (the posterior mean, shifted and scaled)."""
        mean = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(self.dtype)

    @torch.inference_mode()
    def decode(self, latents: Tensor, chunk: int = 8) -> Tensor:
        outs = []
        for part in latents.split(chunk):
            z = part.to(self.device, self.vae_dtype) / self.scaling_factor + self.shift_factor
            outs.append(self.vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(outs)

    # --- requests ---
    def _rows(self, prompt: str, n: int, clip_skip: int | None, guidance: float | None) -> dict[str, Tensor]:
        context, pooled = self.text.encode(prompt, clip_skip)
        rows = {"context": context.expand(n, -1, -1).clone(), "pooled": pooled.expand(n, -1).clone()}
        if guidance is not None:
            rows["guidance"] = torch.full([n], float(guidance), device=self.device)
        return rows

    def _check_family(self, negative_prompt: str | None, cfg_scale: float, guidance: float | None) -> None:
        if guidance is not None and not self.takes_guidance:
            raise SDInputError(
                "guidance", "guidance is the distilled-guidance input of Flux-dev; this model takes none", []
            )
        if not self.uses_cfg:
            if negative_prompt is not None:
                raise SDInputError(
                    "negative_prompt", "Flux models use no classifier-free guidance: omit negative_prompt", []
                )
            if cfg_scale != 1.0:
                raise SDInputError(
                    "cfg_scale",
                    "Flux models use no classifier-free guidance: cfg_scale must be 1"
                    + (" (use guidance)" if self.takes_guidance else ""),
                    [1.0],
                )

    def job_inputs(
        self,
        prompt: str | None,
        negative_prompt: str | None = None,
        *,
        n: int = 1,
        cfg_scale: float = 1.0,
        width: int | None = None,
        height: int | None = None,
        init_image: Tensor | None = None,
        mask: Tensor | None = None,
        clip_skip: int | None = None,
        guidance: float | None = None,
    ) -> SDJobInputs:
        """Check and encode one request.

        ``init_image`` [1, 3, H, W] in [-1, 1]; ``mask`` [1, 1, H, W] in [0, 1], 1 = repaint."""
        self._check_family(negative_prompt, cfg_scale, guidance)
        if mask is not None and init_image is None:
            raise SDInputError("mask", "mask needs an init_image")
        if isinstance(init_image, Tensor) and init_image.ndim == 4:
            ih, iw = int(init_image.shape[-2]), int(init_image.shape[-1])
            height, width = height or ih - ih % self.multiple, width or iw - iw % self.multiple
        height, width = height or self.default_size, width or self.default_size
        shape = self.check_size(height, width)
        g = (self.default_guidance if guidance is None else guidance) if self.takes_guidance else None
        cond = self._rows(prompt or "", n, clip_skip, g)
        uncond = None
        if self.uses_cfg and cfg_scale != 1.0:
            uncond = self._rows(negative_prompt or "", n, clip_skip, g)
        out = SDJobInputs(cond, uncond, shape, (height, width))
        if init_image is None:
            return out
        image = _image(init_image, height, width)
        out.init = self.encode_image(image).expand(n, -1, -1, -1).clone()
        if mask is not None:
            pixel = _mask(mask, tuple(init_image.shape[-2:]), height, width)
            out.mask = F.interpolate(pixel, size=shape[-2:], mode="area").to(self.device, self.dtype)
        return out


def _image(image: Tensor, height: int, width: int) -> Tensor:
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[:2] != (1, 3):
        raise SDInputError("init_image", "init_image must be one RGB image [1, 3, H, W]")
    if not torch.isfinite(image).all() or image.min() < -1.001 or image.max() > 1.001:
        raise SDInputError("init_image", "init_image values must be in [-1, 1]")
    if tuple(image.shape[-2:]) != (height, width):
        image = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False)
    return image.clamp(-1, 1)


def _mask(mask: Tensor, image_hw: tuple[int, ...], height: int, width: int) -> Tensor:
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[:2] != (1, 1):
        raise SDInputError("mask", "mask must be one grayscale image [1, 1, H, W]")
    if tuple(mask.shape[-2:]) != image_hw:
        raise SDInputError("mask", "mask and init_image must have the same size")
    mask = mask.float().clamp(0, 1)
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    return mask


def load_model(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> FlowModel:
    raw = manifest.raw
    dtype = _dtype(raw.get("dtype"), "dtype") or dtype
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    weights = manifest.file("weights", ".")
    if weights.is_dir():
        c = load_flow_diffusers(weights)
    else:  # one original-layout transformer checkpoint + a diffusers-layout config folder
        cfg = manifest.file("config", "config")
        if not cfg.is_dir():
            raise SDLoadError(
                f"{manifest.name}: a single-file transformer needs a config folder ({cfg.name}/)"
            )
        c = load_flow_diffusers(cfg, transformer_file=weights)
        c.source = "single_file"
    if c.family != manifest.kind:
        raise SDLoadError(f"{manifest.name}: manifest kind {manifest.kind!r} but the folder holds {c.family}")
    return FlowModel(
        c,
        device,
        dtype,
        shift=raw.get("shift"),
        max_sequence_length=raw.get("max_sequence_length"),
        guidance=float(manifest.defaults.get("guidance", 3.5)),
        cache_size=int(raw.get("prompt_cache_size", 128)),
        max_size=int(raw.get("max_size", 2048)),
        vae_dtype=_dtype(raw.get("vae_dtype"), "vae_dtype"),
        default_size=manifest.defaults.get("width"),
    )


@dataclass
class FlowLoadedModel(LoadedModel):
    """The store's LoadedModel plus the FlowModel (``sd``: the API builds text jobs through it)."""

    sd: FlowModel | None = None


def load_flow(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> FlowLoadedModel:
    """The model store's loader for kinds "sd3" and "flux"."""
    m = load_model(manifest, device, dtype)
    d = manifest.defaults
    h, w = int(d.get("height", m.default_size)), int(d.get("width", m.default_size))
    shape = m.check_size(h, w)
    return FlowLoadedModel(
        manifest=manifest,
        denoiser=m.denoiser,
        latent_shape=shape,
        image_size=(h, w),
        image_channels=3,
        device=m.device,
        dtype=m.dtype,
        conditioning="text",
        decode=m.decode,
        encode=m.encode_image,
        info={
            "family": m.family,
            "flow": True,
            "uses_cfg": m.uses_cfg,
            "guidance": m.takes_guidance,
            "shift": m.denoiser.shift,
            "dynamic_shift": m.denoiser.dynamic is not None,
            "source": m.components.source,
            "max_size": m.max_size,
            "sigma_min": m.denoiser.sigma_min,
            "sigma_max": m.denoiser.sigma_max,
        },
        sd=m,
    )


register_loader("sd3", load_flow)
register_loader("flux", load_flow)
