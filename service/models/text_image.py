"""What the text-to-image models share: Stable Diffusion (``stable_diffusion.py``) and the
flow-matching models SD3 / Flux (``flow_model.py``).

:class:`TextImageModel` holds the VAE between images and latents, the request size (given, else the
init image's floored to the model's multiple, else the native size; checked), the img2img image and
inpainting mask checks, and builds the store's :class:`TextLoadedModel`. A request that does not fit
raises :data:`InputError` naming the request field. ``load_dtype`` / ``manifest_dtype`` read a
manifest's ``dtype`` / ``vae_dtype``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from service.image_gate import ImageInputError, to_tensor
from service.models.sd_loader import SDLoadError
from service.models.store import JobInputs, LoadedModel, Manifest, PromptAsk, PromptInputs
from service.sampling.errors import InputError

if TYPE_CHECKING:
    from service.serving.request import GenerationRequest


@dataclass
class TextJobInputs:
    """Everything a text-to-image job adds to an engine JobRequest."""

    cond: dict[str, Tensor]  # n rows
    uncond: dict[str, Tensor] | None  # n rows; None when unguided (cfg_scale == 1)
    latent_shape: tuple[int, int, int]
    image_size: tuple[int, int]  # (height, width)
    init: Tensor | None = None  # [n, C, h, w] clean latents (img2img start; blend target)
    mask: Tensor | None = None  # [1, 1, h, w] in [0, 1], 1 = repaint; latent blend for ordinary UNets
    resolved: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # request fields the model settled (guidance)


class TextModelOptions(TypedDict, total=False):
    """What every text-to-image model's constructor takes besides its components (:func:`model_options`)."""

    device: torch.device | str
    dtype: torch.dtype
    cache_size: int
    max_size: int
    vae_dtype: torch.dtype | None
    vae_tile_px: int


class TextInputs(TypedDict, total=False):
    """A request's inputs besides the prompts, as :meth:`TextImageModel.job_inputs` takes them."""

    width: int | None
    height: int | None
    init_image: Tensor | None
    mask: Tensor | None
    clip_skip: int | None
    guidance: float | None
    fields: Any  # the served request (GenerationRequest): conditioning fields a family reads by name


@dataclass
class TextRequest:
    """One request's prompts and guidance as :meth:`TextImageModel.text_rows` encodes them."""

    prompt: str
    negative_prompt: str | None
    n: int
    size: tuple[int, int]  # (height, width)
    cfg_scale: float
    clip_skip: int | None
    guidance: float | None  # Flux-dev's distilled guidance (None: the model's default)
    fields: GenerationRequest | None = None  # the served request (its other conditioning fields)


@dataclass
class TextLoadedModel(LoadedModel):
    """The store's LoadedModel plus its text-to-image model (``text_model``: SD, SD3 or Flux)."""

    text_model: TextImageModel | None = None

    def conditioning_fields(self) -> frozenset[str]:
        return frozenset() if self.text_model is None else self.text_model.conditioning_fields()

    def builds_off_loop(self, request: GenerationRequest) -> bool:
        return True  # prompts are encoded by the text encoders

    def prompt_inputs(self, ask: PromptAsk) -> PromptInputs:
        """The asked size (else the model's) floored to a multiple of 8; the front end resizes back."""
        w, h = ask.size or (self.image_size[1], self.image_size[0])
        gen = (w - w % 8, h - h % 8)
        if min(gen) < 8:
            raise InputError("width" if gen[0] < 8 else "height", "width and height must be at least 8")
        fields = {"prompt": ask.prompt, "negative_prompt": ask.negative_prompt, "cfg_scale": ask.cfg_scale}
        fields |= {"width": gen[0], "height": gen[1]}
        if ask.clip_skip != 1:
            fields["clip_skip"] = ask.clip_skip
        return PromptInputs(fields, gen)

    @property
    def fixed_size(self) -> bool:
        return False

    def size_limit(self) -> int:
        return int(self.info.get("max_size", super().size_limit()))

    def mask_size(self, init_size: tuple[int, int], generated: tuple[int, int]) -> tuple[int, int]:
        return init_size  # resized with the init image to the request size

    def edit_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The init image's size by the model's own rule (:meth:`TextImageModel.init_size`); a side
        shorter than the multiple is the multiple (the image is stretched to it)."""
        if self.text_model is None:
            return None  # refused when the job is built
        w, h = image_size
        m = self.text_model.multiple
        h, w = self.text_model.init_size(max(h, m), max(w, m))
        return w, h

    def bind_driver(self, driver: Any) -> None:
        if self.text_model is not None:
            self.text_model.bind_driver(driver)

    def example_input(self) -> tuple[Tensor, dict[str, Tensor]]:
        """One row at the default size with the empty prompt's conditioning (the keys requests bring)."""
        x, _ = super().example_input()
        if self.text_model is None:
            return x, {}
        return x, self.text_model.job_inputs("", None, n=1, cfg_scale=1.0).cond

    def job_inputs(
        self, request: GenerationRequest, *, n: int, cfg_scale: float, denoise: float
    ) -> JobInputs:
        """Prompts, size, init image and mask through the model's own checks
        (:meth:`TextImageModel.job_inputs`)."""
        tm = self.text_model
        if tm is None:
            raise InputError("model", f"model {self.name!r} has no text encoder loaded", [])
        if request.class_label is not None:
            raise InputError(
                "class_label", f"model {self.name!r} is text-conditional; use prompt, not class_label", []
            )
        if request.init_image is None and denoise < 1.0:
            raise InputError("denoise", "denoise < 1 needs an init_image", [1.0])
        images: dict[str, Tensor | None] = {"init_image": None, "mask": None}
        for name, channels in (("init_image", 3), ("mask", 1)):
            data = getattr(request, name)
            if data is None:
                continue
            try:
                t = to_tensor(data, name, None, channels)
            except ImageInputError as exc:
                raise InputError(exc.field, exc.message, exc.allowed) from exc
            images[name] = t if name == "init_image" else (t + 1) / 2
        inp = tm.job_inputs(
            request.prompt,
            request.negative_prompt,
            n=n,
            cfg_scale=cfg_scale,
            width=request.width,
            height=request.height,
            init_image=images["init_image"],
            mask=images["mask"],
            clip_skip=request.clip_skip,
            guidance=request.guidance,
            fields=request,
        )
        resolved = {"image_size": inp.image_size, **inp.resolved}
        return JobInputs(inp.cond, inp.uncond, inp.init, inp.mask, inp.latent_shape, resolved)


class TextImageModel:
    """A text-to-image model's requests (:meth:`job_inputs`), VAE, sizes, init images and masks.

    Subclasses set ``denoiser``, ``multiple`` (width and height are multiples of it),
    ``default_size`` and the defaults of the direct path (``default_sampler``, ``default_schedule``,
    ``default_cfg``), and encode prompts in :meth:`text_rows`.
    """

    denoiser: Any
    takes_guidance = False  # Flux-dev's distilled guidance input
    multiple: int
    default_size: int
    default_sampler: str
    default_schedule: str
    default_cfg: float

    def __init__(
        self,
        components: Any,
        text_encoders: Iterable[Any],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 128,
        max_size: int = 2048,
        vae_dtype: torch.dtype | None = None,
        vae_tile_px: int = 0,
    ) -> None:
        """Moves the VAE (``vae_dtype``, default: float32 for a float16 model) and the text encoders
        to the device; ``cache_size``: encoded prompts kept; ``max_size``: the largest width/height;
        ``vae_tile_px``: images wider or taller than this are decoded in tiles of this size (0: never)."""
        self.components = components
        self.device, self.dtype = torch.device(device), dtype
        self.cache_size, self.max_size = int(cache_size), int(max_size)
        self.vae_tile_px = int(vae_tile_px)
        self.vae_dtype = vae_dtype or (torch.float32 if dtype == torch.float16 else dtype)
        self.vae: Any = components.vae.to(self.device, self.vae_dtype).eval()
        for enc in text_encoders:
            enc.to(self.device, dtype).eval()
        vcfg: Any = components.vae.config
        self.latent_channels = int(vcfg.latent_channels)
        self.vae_scale = 2 ** (len(vcfg.block_out_channels) - 1)
        self.scaling_factor = float(vcfg.scaling_factor)
        self.shift_factor = float(getattr(vcfg, "shift_factor", None) or 0.0)

    # --- requests ---
    def job_inputs(
        self,
        prompt: str | None,
        negative_prompt: str | None = None,
        *,
        n: int = 1,
        cfg_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        init_image: Tensor | None = None,
        mask: Tensor | None = None,
        clip_skip: int | None = None,
        guidance: float | None = None,
        fields: GenerationRequest | None = None,
    ) -> TextJobInputs:
        """Check and encode one request (``cfg_scale`` defaults to the model's ``default_cfg``).

        ``init_image``: [1, 3, H, W] in [-1, 1] at its own size; ``mask``: [1, 1, H, W] in [0, 1] (1 =
        repaint), the init image's size. Width and height default to the init image's (floored to the
        model's multiple), else the model's native size. ``guidance``: Flux-dev only. ``fields``: the
        served request, for conditioning fields a family reads by name (SDXL's micro-conditioning).
        """
        cfg = self.default_cfg if cfg_scale is None else cfg_scale
        if guidance is not None and not self.takes_guidance:
            raise InputError(
                "guidance", "guidance is the distilled-guidance input of Flux-dev; this model takes none", []
            )
        self.check_request(negative_prompt, cfg)
        height, width, shape = self.request_size(init_image, mask, height, width)
        req = TextRequest(prompt or "", negative_prompt, n, (height, width), cfg, clip_skip, guidance, fields)
        cond, uncond = self.text_rows(req)
        out = TextJobInputs(cond, uncond, shape, (height, width), resolved=self.resolved(req))
        self.add_images(out, init_image, mask, n)
        return out

    def conditioning_fields(self) -> frozenset[str]:
        """The optional request fields this model reads (Flux-dev: its distilled guidance)."""
        return frozenset({"guidance"}) if self.takes_guidance else frozenset()

    def resolved(self, req: TextRequest) -> dict[str, Any]:
        """Request fields this family settles that the request left out (Flux-dev: its guidance)."""
        return {}

    def bind_driver(self, driver: Any) -> None:
        """Settle what depends on the job's sigmas in its conditioning rows (SD: ControlNet windows)."""

    def check_request(self, negative_prompt: str | None, cfg_scale: float) -> None:
        """Refuse what the model family does not take (Flux: negative prompts, CFG)."""

    def text_rows(self, req: TextRequest) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """cond rows (and uncond rows when guided) for ``req.n`` images of one prompt."""
        raise NotImplementedError

    def add_images(self, out: TextJobInputs, init_image: Tensor | None, mask: Tensor | None, n: int) -> None:
        """img2img start latents (``out.init``) and the inpainting mask (``out.mask``: a latent blend)."""
        if init_image is not None:
            _, pixel_mask = self.add_init(out, init_image, mask, n)
            if pixel_mask is not None:
                out.mask = self.latent_mask(pixel_mask, out)

    # --- sizes ---
    def check_size(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent shape for an image size, or InputError naming width/height."""
        for field, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % self.multiple:
                raise InputError(field, f"{field} must be a positive multiple of {self.multiple}, got {v}")
            if v > self.max_size:
                raise InputError(
                    field, f"{field} must be at most {self.max_size}, got {v}", [8, self.max_size]
                )
        return (self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    def request_size(
        self, init_image: Tensor | None, mask: Tensor | None, height: int | None, width: int | None
    ) -> tuple[int, int, tuple[int, int, int]]:
        """(height, width, latent shape) of a request: width and height default to the init image's
        (floored to the model's multiple), else the model's native size."""
        if mask is not None and init_image is None:
            raise InputError("mask", "mask needs an init_image")
        if isinstance(init_image, Tensor) and init_image.ndim == 4:
            ih, iw = self.init_size(int(init_image.shape[-2]), int(init_image.shape[-1]))
            height, width = height or ih, width or iw
        height, width = height or self.default_size, width or self.default_size
        return height, width, self.check_size(height, width)

    def init_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) a request without a size takes from an init image of this size:
        floored to the model's multiple."""
        return height - height % self.multiple, width - width % self.multiple

    # --- VAE ---
    @torch.inference_mode()
    def encode_image(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents (the posterior mean, shifted and scaled)."""
        mean = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(self.dtype)

    @torch.inference_mode()
    def decode(self, latents: Tensor, chunk: int = 8) -> Tensor:
        """Latents -> images in [-1, 1], ``chunk`` images per VAE call."""
        outs = []
        for part in latents.split(chunk):
            z = part.to(self.device, self.vae_dtype) / self.scaling_factor + self.shift_factor
            outs.append(self._vae_decode(z).float().clamp(-1, 1))
        return torch.cat(outs)

    def _vae_decode(self, z: Tensor) -> Tensor:
        """One VAE decode; past ``vae_tile_px`` in tiles of that size (a quarter overlapping, blended:
        diffusers' tiled decoder), so the decoder's activations stay bounded however large the image."""
        px = self.vae_tile_px
        if not px or max(z.shape[-2:]) * self.vae_scale <= px:
            return self.vae.decode(z).sample
        # set per call, not with enable_tiling(): that would also tile every encode
        self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = px, px // self.vae_scale
        return self.vae.tiled_decode(z).sample

    # --- init image and mask ---
    def add_init(
        self, out: TextJobInputs, init_image: Tensor, mask: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor | None]:
        """Check the init image (and mask) and put the image's latents in ``out.init``: the image
        and the pixel mask at the request size."""
        height, width = out.image_size
        image_hw = (
            (int(init_image.shape[-2]), int(init_image.shape[-1]))
            if isinstance(init_image, Tensor)
            else (0, 0)
        )
        image = _image(init_image, height, width)
        pixel_mask = None if mask is None else _mask(mask, image_hw, height, width)
        out.init = self.encode_image(image).expand(n, -1, -1, -1).clone()
        return image, pixel_mask

    def latent_mask(self, pixel_mask: Tensor, out: TextJobInputs) -> Tensor:
        """The pixel mask at latent size (the driver's latent blend)."""
        return F.interpolate(pixel_mask, size=out.latent_shape[-2:], mode="area").to(self.device, self.dtype)

    # --- the model store ---
    def store_info(self) -> dict[str, Any]:
        """The model family's entries of the store's ``info`` (``GET /models``)."""
        return {}

    def loaded(self, manifest: Manifest) -> TextLoadedModel:
        """The store's LoadedModel at the manifest's default size."""
        d = manifest.model_defaults
        h, w = d.height or self.default_size, d.width or self.default_size
        return TextLoadedModel(
            manifest=manifest,
            denoiser=self.denoiser,
            latent_shape=self.check_size(h, w),
            image_size=(h, w),
            image_channels=3,
            device=self.device,
            dtype=self.dtype,
            conditioning="text",
            decode=self.decode,
            encode=self.encode_image,
            info={
                **self.store_info(),
                "source": self.components.source,
                "max_size": self.max_size,
                "sigma_min": self.denoiser.sigma_min,
                "sigma_max": self.denoiser.sigma_max,
            },
            text_model=self,
        )


def _image(image: Tensor, height: int, width: int) -> Tensor:
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[:2] != (1, 3):
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InputError("init_image", f"init_image must be one RGB image [1, 3, H, W]; got {got}")
    if not torch.isfinite(image).all() or image.min() < -1.001 or image.max() > 1.001:
        raise InputError("init_image", "init_image values must be in [-1, 1]")
    if tuple(image.shape[-2:]) != (height, width):
        image = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False)
    return image.clamp(-1, 1)


def _mask(mask: Tensor, image_hw: tuple[int, int], height: int, width: int) -> Tensor:
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[:2] != (1, 1):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise InputError("mask", f"mask must be one grayscale image [1, 1, H, W]; got {got}")
    if tuple(mask.shape[-2:]) != image_hw:
        mh, mw = mask.shape[-2:]
        raise InputError(
            "mask", f"mask is {mw}x{mh} but init_image is {image_hw[1]}x{image_hw[0]}; they must match"
        )
    mask = mask.float().clamp(0, 1)
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    return mask


def manifest_dtype(name: Any, what: str) -> torch.dtype | None:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name is None:
        return None
    if name not in table:
        raise SDLoadError(f"manifest field {what} must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def model_options(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> TextModelOptions:
    """The constructor options every text model takes: where it runs and in what dtype, and what it reads
    from its manifest (prompt cache, size, VAE dtype)."""
    raw = manifest.raw
    return {
        "device": device,
        "dtype": dtype,
        "cache_size": int(raw.get("prompt_cache_size", 128)),
        "max_size": int(raw.get("max_size", 2048)),
        "vae_dtype": manifest_dtype(raw.get("vae_dtype"), "vae_dtype"),
        # on a GPU a 2048 px decode in one piece needs ~10 GB of activations; CPU memory is the host's
        "vae_tile_px": _int_field(raw, "vae_tile_px", 1024 if device.type == "cuda" else 0),
    }


def _int_field(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SDLoadError(f"manifest field {key} must be an integer >= 0, got {value!r}")
    return value


def load_dtype(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The manifest's ``dtype`` (else the caller's); float32 on CPU for a float16 request."""
    dtype = manifest_dtype(manifest.raw.get("dtype"), "dtype") or dtype
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 convolutions are slow or missing on CPU
    return dtype
