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

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.models.controlnet import ControlSet, scan
from service.models.embeddings import EmbeddingError
from service.models.ipadapter import ImageAdapters
from service.models.ipadapter import scan as scan_ip_adapters
from service.models.sd_loader import (
    SDComponents,
    SDLoadError,
    check_consistency,
    load_diffusers,
    load_single_file,
)
from service.models.sd_text import Encoded, PromptEncoder
from service.models.sd_unet import make_denoiser
from service.models.store import Manifest, register_loader
from service.models.text_image import (
    TextImageModel,
    TextJobInputs,
    TextLoadedModel,
    TextModelOptions,
    TextRequest,
    load_dtype,
    model_options,
)
from service.sampling.errors import InputError

if TYPE_CHECKING:
    from typing_extensions import Unpack


class StableDiffusion(TextImageModel):
    default_sampler, default_schedule, default_cfg = "dpmpp_2m", "karras", 7.0

    def __init__(
        self,
        c: SDComponents,
        *,
        prediction_type: str | None = None,
        clip_skip: int = 1,
        quantize: bool = False,
        where: str = "",
        **options: Unpack[TextModelOptions],
    ) -> None:
        check_consistency(c, where or "model")
        super().__init__(c, c.text_encoders, **options)
        self.is_sdxl = c.is_sdxl
        self.unet: Any = c.unet.to(self.device, self.dtype).eval()
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
            cache_size=self.cache_size,
            device=self.device,
        )
        self.force_zeros = self.is_sdxl and bool(c.model_index.get("force_zeros_for_empty_prompt", True))
        self.inpainting = int(c.unet.config.in_channels) == 2 * self.latent_channels + 1
        self.multiple = max(8, self.vae_scale)
        self.default_size = int(c.unet.config.sample_size) * self.vae_scale

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
        crop: list[int] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """cond (and uncond when guided) rows for n images of one prompt; SDXL: ``crop`` (top, left)
        of its time ids (default 0, 0)."""
        pos = self._encode("prompt", prompt, clip_skip)
        neg: Encoded | None = None
        if guided:
            if self.force_zeros and negative_prompt is None:
                neg = self.text.zeros_like(pos)
            else:
                neg = self._encode("negative_prompt", negative_prompt or "", clip_skip)
            chunks = max(pos.chunks, neg.chunks)
            pos, neg = self.text.pad_to(pos, chunks, clip_skip), self.text.pad_to(neg, chunks, clip_skip)
        top, left = crop or (0, 0)
        rows = (n, height, width, top, left)
        return self._rows(pos, *rows), (None if neg is None else self._rows(neg, *rows))

    def _encode(self, field: str, prompt: str, clip_skip: int | None) -> Encoded:
        """One prompt; an ``embedding:name`` naming no usable embedding is an InputError on ``field``."""
        try:
            return self.text.encode(prompt, clip_skip)
        except EmbeddingError as exc:
            raise InputError(field, exc.message, exc.allowed) from exc

    def _rows(self, enc: Encoded, n: int, height: int, width: int, top: int, left: int) -> dict[str, Tensor]:
        d = {"context": enc.context.expand(n, -1, -1).clone()}
        if self.is_sdxl:  # time ids: original size, crop top-left, target size (diffusers' order)
            assert enc.pooled is not None
            d["y"] = enc.pooled.expand(n, -1).clone()
            values = [height, width, top, left, height, width]
            ids = torch.tensor(values, dtype=torch.float32, device=self.device)
            d["time_ids"] = ids.expand(n, -1).clone()
        return d

    # --- ControlNet ---
    def attach_controls(self, manifest: Manifest, reserve: Callable[[int], None] | None = None) -> None:
        """ControlNets from the store's ``controlnet/`` folder, applied per row inside the UNet call;
        ``reserve``: the memory budget each one is loaded within (LoadedModel.reserve_memory)."""
        self.controls = ControlSet(
            manifest.folder.parent,
            self.unet.config,
            self.device,
            self.dtype,
            manifest.name,
            reserve=reserve,
        )
        self.denoiser.inner_model.controls = self.controls

    def _control_rows(
        self, req: TextRequest, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None
    ) -> None:
        """Every row carries the ControlNet keys once the store has ControlNets (so rows with units
        and rows without share calls); a request's units fill its rows' slots."""
        units = None if req.fields is None else req.fields.controlnets
        controls: ControlSet | None = getattr(self, "controls", None)
        if controls is None or not (units or scan(controls.root)):
            if units:
                raise InputError("controlnets", "this model takes no ControlNet units", [])
            return
        height, width = req.size
        prepared = controls.prepare(list(units or []), height, width)
        cond.update(controls.rows(prepared, req.n, height, width, uncond=False))
        if uncond is not None:
            uncond.update(controls.rows(prepared, req.n, height, width, uncond=True))

    # --- IP-Adapter ---
    def attach_ip_adapters(self, manifest: Manifest, reserve: Callable[[int], None] | None = None) -> None:
        """IP-Adapters from the store's ``ipadapter/`` folder, applied per row inside the UNet call;
        ``reserve``: the memory budget each adapter and encoder is loaded within."""
        root, name = manifest.folder.parent, manifest.name
        self.images = ImageAdapters(root, self.unet, self.device, self.dtype, name, reserve=reserve)
        self.denoiser.inner_model.images = self.images

    def _ip_rows(self, req: TextRequest, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None) -> None:
        """Every row carries the IP-Adapter keys once the store has adapters (rows with images and
        rows without share calls); a request's images fill its rows' slots."""
        refs = list((req.fields and req.fields.ip_adapters) or [])
        images: ImageAdapters | None = getattr(self, "images", None)
        if images is not None and (refs or scan_ip_adapters(images.root)):
            images.add_rows(refs, req.n, cond, uncond)
        elif refs:
            raise InputError("ip_adapters", "this model takes no IP-Adapters", [])

    def bind_driver(self, driver: Any) -> None:
        """ControlNet units' and IP-Adapters' guidance_start / guidance_end -> each row's timestep
        window, from the job's sigmas."""
        for rows in (driver.cond, driver.uncond or {}):
            ControlSet.bind_schedule(rows, driver.sigmas, self.denoiser.sigma_to_t)
            ImageAdapters.bind_schedule(rows, driver.sigmas, self.denoiser.sigma_to_t)

    def text_rows(self, req: TextRequest) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        cond, uncond = self._text_rows(req)
        self._control_rows(req, cond, uncond)
        self._ip_rows(req, cond, uncond)
        return cond, uncond

    def _text_rows(self, req: TextRequest) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        guided = req.cfg_scale != 1.0
        crop = None if req.fields is None else req.fields.crops_coords_top_left
        if crop is not None and not all(0 <= int(v) <= self.max_size for v in crop):
            raise InputError(
                "crops_coords_top_left", f"crops_coords_top_left must be 2 integers in [0, {self.max_size}]"
            )
        return self.text_conditioning(
            req.prompt, req.negative_prompt, req.n, *req.size, guided, req.clip_skip, crop=crop
        )

    def conditioning_fields(self) -> frozenset[str]:
        extra = {"crops_coords_top_left"} if self.is_sdxl else set()  # SDXL's micro-conditioning
        if getattr(self, "controls", None) is not None:
            extra.add("controlnets")
        if getattr(self, "images", None) is not None:
            extra.add("ip_adapters")
        return super().conditioning_fields() | extra

    def add_images(self, out: TextJobInputs, init_image: Tensor | None, mask: Tensor | None, n: int) -> None:
        """9-channel inpainting UNets: the masked-image conditioning instead of the latent blend."""
        if not self.inpainting:
            return super().add_images(out, init_image, mask, n)
        height, width = out.image_size
        if init_image is None:  # no image: an inpainting UNet repaints everything
            self._add_concat(out, torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width), n)
            return None
        image, pixel_mask = self.add_init(out, init_image, mask, n)
        self._add_concat(out, image, torch.ones(1, 1, height, width) if pixel_mask is None else pixel_mask, n)
        return None

    def store_info(self) -> dict[str, Any]:
        family = "sdxl" if self.is_sdxl else "sd"
        return {"family": family, "prediction_type": self.prediction_type, "inpainting": self.inpainting}

    def _add_concat(self, out: TextJobInputs, image: Tensor, pixel_mask: Tensor, n: int) -> None:
        """9-channel UNets: [binary mask at latent size, latents of the image with the masked part zeroed]."""
        binary = (pixel_mask >= 0.5).float()
        masked = self.encode_image(image.to(binary.device) * (1 - binary))
        small = F.interpolate(binary, size=out.latent_shape[-2:]).to(self.device, self.dtype)
        concat = torch.cat([small, masked], dim=1).expand(n, -1, -1, -1).clone()
        out.cond["c_concat"] = concat
        if out.uncond is not None:
            out.uncond["c_concat"] = concat.clone()


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
    dtype = load_dtype(manifest, device, dtype)
    c = load_components(manifest)
    try:
        return StableDiffusion(
            c,
            prediction_type=raw.get("prediction_type"),
            clip_skip=int(raw.get("clip_skip", 1)),
            quantize=bool(raw.get("quantize", False)),
            **model_options(manifest, device, dtype),
            where=f"{manifest.name} ({manifest.folder})",
        )
    except ValueError as exc:
        raise SDLoadError(f"{manifest.name}: {exc}") from exc


def load_stable_diffusion(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> TextLoadedModel:
    """The model store's loader for kind "stable_diffusion"."""
    sd = load_model(manifest, device, dtype)
    loaded = sd.loaded(manifest)
    sd.attach_controls(manifest, loaded.reserve_memory)  # its ControlNets count in its memory
    sd.attach_ip_adapters(manifest, loaded.reserve_memory)  # adapters and encoders too
    return loaded


register_loader("stable_diffusion", load_stable_diffusion)
