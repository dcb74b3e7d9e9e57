"""Wrap a diffusers UNet2DConditionModel as a discrete eps/v denoiser over its own sigma table."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor, nn

from service.models.ipadapter.attention import image_rows
from service.models.stepcache import sd_unet as deepcache
from service.models.stepcache.state import RowBinder, bound_rows, live
from service.sampling.denoisers import DiscreteEpsDenoiser, DiscreteVDenoiser

if TYPE_CHECKING:
    from typing_extensions import Unpack

PREDICTION_TYPES = ("epsilon", "v_prediction")


class UNetRows(TypedDict, total=False):
    """What a batch's rows may carry besides the text context, each [rows, ...]."""

    y: Tensor | None  # SDXL: the pooled text embedding
    time_ids: Tensor | None  # SDXL: size and crop ids
    c_concat: Tensor | None  # inpainting UNets: mask + masked-image latents
    control_hint: Tensor | None  # the rows' ControlNet units (controlnet/units.py)
    control_unit: Tensor | None
    ip_tokens: Tensor | None  # their IP-Adapter images (ipadapter/adapters.py)
    ip_unit: Tensor | None
    cache: Tensor | None  # their step cache (models/stepcache: DeepCache, stepcache/sd_unet.py)


class SDUNet(nn.Module):
    """``inner(x_in, t, context, y=None, time_ids=None, c_concat=None)`` -> eps or v.

    ``context`` is the CLIP hidden states [B, L, D]; SDXL adds the pooled text embedding ``y``
    [B, P] and ``time_ids`` [B, 6]; inpainting UNets (9 input channels) get ``c_concat``
    [B, 5, h, w] (mask, masked-image latents) appended to the scaled input.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.controls: Any = None  # a ControlSet when the model's store has ControlNets
        self.images: Any = None  # an ipadapter.ImageAdapters when the store has IP-Adapters

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def cache_methods(self) -> tuple[str, ...]:
        """DeepCache where the UNet has the standard SD / SDXL layout (stepcache/sd_unet.py)."""
        return ("deepcache",) if deepcache.supports(self.unet) else ()

    def forward(self, x: Tensor, t: Tensor, context: Tensor, **rows: Unpack[UNetRows]) -> Tensor:
        """``rows``: the batch's per-row conditioning besides the text context (:class:`UNetRows`)."""
        dt = self.dtype
        y, time_ids, c_concat = rows.get("y"), rows.get("time_ids"), rows.get("c_concat")
        inp = x if c_concat is None else torch.cat([x, c_concat.to(x.dtype)], dim=1)
        added: dict[str, Tensor] | None = None
        if y is not None or time_ids is not None:
            if y is None or time_ids is None:
                raise ValueError("an SDXL UNet needs both the pooled embedding y and time_ids")
            added = {"text_embeds": y.to(dt), "time_ids": time_ids.to(dt)}
        control_hint, control_unit = rows.get("control_hint"), rows.get("control_unit")
        cn_args = None
        if control_unit is not None and control_hint is not None and self.controls is not None:
            cn_args = (x, t, context, control_hint, control_unit, {"y": y, "time_ids": time_ids})
        cache = rows.get("cache")
        if live(cache):  # some rows with a step cache: DeepCache's split forward
            # the ControlNets' deeper layers run for the rows that run the UNet's deep part only
            split = deepcache.levels(self.unet, cache)
            staged = None if cn_args is None else self.controls.staged(*cn_args, split[0])
            with self._images(rows, t), bound_rows(self._image_rows(rows, t)):
                out = deepcache.forward(self.unet, cache, inp.to(dt), t, context.to(dt), added, staged, split)
            return out.to(x.dtype)  # type: ignore[no-any-return]
        staged = None if cn_args is None else self.controls.staged(*cn_args)
        res = None if staged is None else staged.full()
        extra: dict[str, Any] = {}
        if res is not None:
            extra["down_block_additional_residuals"] = tuple(res[0])
            extra["mid_block_additional_residual"] = res[1]
        with self._images(rows, t):  # the UNet's cross-attention reads the rows' image tokens
            out = self.unet(
                inp.to(dt),
                t,
                encoder_hidden_states=context.to(dt),
                added_cond_kwargs=added,
                return_dict=False,
                **extra,
            )[0]
        return out.to(x.dtype)  # type: ignore[no-any-return]

    def _images(self, rows: UNetRows, t: Tensor) -> AbstractContextManager[None]:
        """The rows' IP-Adapter images bound for the UNet call (the ControlNets' attention has no
        image processors, so their layers may run inside it)."""
        if self.images is None:
            return nullcontext()
        return self.images.bind(rows.get("ip_tokens"), rows.get("ip_unit"), t)  # type: ignore[no-any-return]

    def _image_rows(self, rows: UNetRows, t: Tensor) -> RowBinder:
        """The IP-Adapter rows of part of a call (the step cache's deep part on some rows; ``index``
        is of the rows bound at the time: nested parts, as rows of different levels make, pick from
        their enclosing part's rows, as RowLora does)."""
        tokens, unit = rows.get("ip_tokens"), rows.get("ip_unit")
        if self.images is None or tokens is None or unit is None:
            return _nothing
        bound = [tokens, unit, t.reshape(-1).expand(unit.shape[0])]

        @contextmanager
        def select(index: Tensor) -> Iterator[None]:
            before = list(bound)
            bound[:] = [v.index_select(0, index.to(v.device)) for v in before]
            try:
                with image_rows([]), self.images.bind(*bound):
                    yield
            finally:
                bound[:] = before

        return select


@contextmanager
def _nothing(index: Tensor) -> Iterator[None]:
    yield


def alphas_cumprod_from_config(cfg: dict[str, Any]) -> Tensor:
    """alpha_bar_t for t = 0 .. T-1 from a diffusers scheduler config (computed as diffusers does)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "squaredcos_cap_v2":

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr (zero terminal SNR) is not supported")
    return torch.cumprod(1.0 - betas.float(), dim=0)


def make_denoiser(
    unet: nn.Module,
    scheduler_config: dict[str, Any],
    prediction_type: str | None = None,
    quantize: bool = False,
) -> DiscreteEpsDenoiser | DiscreteVDenoiser:
    """The discrete denoiser for ``unet`` (eps or v, from the manifest or the scheduler config)."""
    kind = prediction_type or scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {kind!r}; supported: {', '.join(PREDICTION_TYPES)}")
    alphas = alphas_cumprod_from_config(scheduler_config)
    cls = DiscreteVDenoiser if kind == "v_prediction" else DiscreteEpsDenoiser
    return cls(SDUNet(unet), alphas, quantize=quantize)
