"""SD3 / SD3.5 and Flux for the sampling core and the engine (manifest kinds "sd3" and "flux").

:class:`FlowModel` mirrors :class:`~service.models.stable_diffusion.StableDiffusion`'s surface:
``job_inputs`` turns a request into conditioning rows (``context`` [B, L, D], ``pooled`` [B, P],
and Flux-dev's ``guidance`` [B]), the latent shape, img2img latents and the inpainting mask
(latent blend), raising InputError naming the request field; ``decode`` / ``encode_image``.
Its ``denoiser`` is a :class:`~service.sampling.flow.FlowDenoiser`: drivers see ``flow = True``
and run the flow forms of the samplers (service/sampling/flow.py).

CFG rows: SD3 uses classifier-free guidance (uncond rows when cfg_scale != 1); Flux does not
(schnell is distilled to few steps, dev takes the distilled ``guidance`` scale as an input), so
a negative prompt or cfg_scale != 1 on Flux is a 422.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from service.models.controlnet import ControlSet, scan
from service.models.controlnet.flux_units import FluxControlSet, t_scale
from service.models.flow_loader import FlowComponents, load_flow_diffusers
from service.models.flow_nets import FluxVelocity, SD3Velocity
from service.models.flow_text import FlowPromptEncoder
from service.models.quant.qtensor import quantization
from service.models.sd_loader import SDLoadError
from service.models.store import LoadedModel, Manifest, register_loader
from service.models.text_image import (
    TextImageModel,
    TextModelOptions,
    TextRequest,
    load_dtype,
    model_options,
)
from service.sampling.errors import InputError
from service.sampling.flow import TRAIN_STEPS, FlowDenoiser, flux_shift

if TYPE_CHECKING:
    from typing_extensions import Unpack


class FlowModel(TextImageModel):
    default_sampler, default_schedule = "euler", "flow"

    def __init__(
        self,
        c: FlowComponents,
        *,
        shift: float | None = None,
        max_sequence_length: int | None = None,
        guidance: float = 3.5,
        default_size: int | None = None,
        **options: Unpack[TextModelOptions],
    ) -> None:
        super().__init__(c, c.text_encoders.values(), **options)
        self.family = c.family
        self.transformer: Any = c.transformer.to(self.device, self.dtype).eval()
        tcfg: Any = self.transformer.config
        sc = c.scheduler_config
        flux = self.family == "flux"
        self.multiple = self.vae_scale * (2 if flux else int(tcfg.patch_size))
        native = 1024 if flux else int(tcfg.sample_size) * self.vae_scale
        self.default_size = int(default_size or native)
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
        self.velocity = velocity
        self.controls: FluxControlSet | None = None  # Flux: the store's ControlNets (attach_controls)
        self.denoiser = FlowDenoiser(
            velocity,  # type: ignore[arg-type]
            shift=base_shift,
            ramp_end=None if flux else 1.0 / TRAIN_STEPS,
            dynamic=dynamic,  # type: ignore[arg-type]
        )
        self.denoiser.to(self.device)
        self.unet = None  # service.models.lora attaches to the transformer
        self.uses_cfg = not flux
        self.default_cfg = 7.0 if self.uses_cfg else 1.0
        self.takes_guidance = flux and bool(tcfg.guidance_embeds)
        self.default_guidance = float(guidance)
        self.text = FlowPromptEncoder(
            self.family,
            c.tokenizers,
            c.text_encoders,
            max_sequence_length=max_sequence_length or (512 if flux else 256),
            joint_dim=int(tcfg.joint_attention_dim),
            device=self.device,
            cache_size=self.cache_size,
        )

    # --- requests ---
    def _rows(self, prompt: str, n: int, clip_skip: int | None, guidance: float | None) -> dict[str, Tensor]:
        context, pooled = self.text.encode(prompt, clip_skip)
        rows = {"context": context.expand(n, -1, -1).clone(), "pooled": pooled.expand(n, -1).clone()}
        if guidance is not None:
            rows["guidance"] = torch.full([n], float(guidance), device=self.device)
        return rows

    def store_info(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "flow": True,
            "uses_cfg": self.uses_cfg,
            "guidance": self.takes_guidance,
            "shift": self.denoiser.shift,
            "dynamic_shift": self.denoiser.dynamic is not None,
            **quantization(self.transformer),
        }

    def check_request(self, negative_prompt: str | None, cfg_scale: float) -> None:
        if not self.uses_cfg:
            if negative_prompt is not None:
                raise InputError(
                    "negative_prompt", "Flux models use no classifier-free guidance: omit negative_prompt", []
                )
            if cfg_scale != 1.0:
                raise InputError(
                    "cfg_scale",
                    "Flux models use no classifier-free guidance: cfg_scale must be 1"
                    + (" (use guidance)" if self.takes_guidance else ""),
                    [1.0],
                )

    def resolved(self, req: TextRequest) -> dict[str, Any]:
        """Flux-dev records the guidance it ran with (the request's, else the model's default)."""
        if not self.takes_guidance:
            return {}
        return {"guidance": self.default_guidance if req.guidance is None else req.guidance}

    def text_rows(self, req: TextRequest) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        guidance = self.default_guidance if req.guidance is None else req.guidance
        g = guidance if self.takes_guidance else None
        cond = self._rows(req.prompt, req.n, req.clip_skip, g)
        uncond = None
        if self.uses_cfg and req.cfg_scale != 1.0:
            uncond = self._rows(req.negative_prompt or "", req.n, req.clip_skip, g)
        self._control_rows(req, cond)
        return cond, uncond

    # --- ControlNet (Flux) ---
    def attach_controls(self, manifest: Manifest, reserve: Callable[[int], None] | None = None) -> None:
        """Flux: the store's ``controlnet/`` Flux ControlNets, applied per row inside the transformer
        call; ``reserve``: the memory budget each one is loaded within (LoadedModel.reserve_memory)."""
        if self.family != "flux":
            return
        self.controls = FluxControlSet(
            manifest.folder.parent,
            self.transformer,
            self.encode_image,
            self.device,
            self.dtype,
            manifest.name,
            self.default_guidance,
            reserve=reserve,
        )
        self.velocity.controls = self.controls

    def _control_rows(self, req: TextRequest, cond: dict[str, Tensor]) -> None:
        """Every row carries the ControlNet keys once the store has ControlNets (rows with units and
        rows without share calls); a request's units fill its rows' slots (Flux: no uncond rows)."""
        units = None if req.fields is None else req.fields.controlnets
        if self.controls is None or not (units or scan(self.controls.root)):
            if units:
                raise InputError("controlnets", "this model takes no ControlNet units", [])
            return
        if units and getattr(req.fields, "cache", None) is not None:
            raise InputError(
                "cache", "a request with Flux ControlNet units takes no step cache: omit cache", []
            )
        height, width = req.size
        grid = (height // self.vae_scale // 2, width // self.vae_scale // 2)  # the 2x2-patch tokens
        prepared = self.controls.prepare_flux(list(units or []), height, width, grid)
        tokens = (grid[0] * grid[1], int(self.transformer.config.in_channels))
        cond.update(self.controls.flux_rows(prepared, req.n, tokens))

    def bind_driver(self, driver: Any) -> None:
        """ControlNet units' guidance_start / guidance_end -> each row's window of 1000 t."""
        ControlSet.bind_schedule(driver.cond, driver.sigmas, t_scale)

    def conditioning_fields(self) -> frozenset[str]:
        extra = {"controlnets"} if self.controls is not None else set()
        return super().conditioning_fields() | extra


def load_model(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> FlowModel:
    raw = manifest.raw
    dtype = load_dtype(manifest, device, dtype)
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
    d = manifest.model_defaults
    return FlowModel(
        c,
        shift=raw.get("shift"),
        max_sequence_length=raw.get("max_sequence_length"),
        guidance=3.5 if d.guidance is None else d.guidance,
        **model_options(manifest, device, dtype),
        default_size=d.width,
    )


def load_flow(manifest: Manifest, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model store's loader for kinds "sd3" and "flux" (``text_model``: the FlowModel)."""
    m = load_model(manifest, device, dtype)
    loaded = m.loaded(manifest)
    m.attach_controls(manifest, loaded.reserve_memory)  # Flux: its ControlNets count in its memory
    return loaded


register_loader("sd3", load_flow)
register_loader("flux", load_flow)
