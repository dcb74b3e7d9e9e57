"""Classifier-free guidance (Ho & Salimans 2022): cond and uncond rows in one model call.

Conditioning is a dict of tensors whose first dim is the batch (e.g. ``{"class_cond": labels}``);
the cond and uncond dicts are concatenated per key so one call evaluates both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .stepper import Guided

Cond = Mapping[str, Tensor]


def cat_cond(conds: Sequence[Cond]) -> dict[str, Tensor]:
    """Concatenate conditioning dicts along the batch dim; all must have the same keys."""
    if not conds:
        return {}
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"conditioning keys differ: {sorted(keys)} vs {sorted(c)}")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cfg_combine(cond_out: Tensor, uncond_out: Tensor, scale: float | Tensor) -> Tensor:
    """Guided prediction uncond + scale * (cond - uncond); scale may be per image ([B])."""
    if isinstance(scale, Tensor) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (cond_out.ndim - 1))).to(cond_out.dtype)
    return uncond_out + (cond_out - uncond_out) * scale


class CFGDenoiser(nn.Module):
    """Wrap a denoiser: ``(x, sigma, cond, uncond, cond_scale)`` -> guided denoised, one batched call.

    With ``cond_scale == 1`` or no uncond it calls the model on the cond rows only. When
    ``return_uncond`` is set it returns ``(guided, uncond_denoised)`` for CFG++ samplers.
    """

    def __init__(self, model: Any, return_uncond: bool = False) -> None:
        super().__init__()
        self.inner_model = model
        self.return_uncond = return_uncond
        # what schedules and drivers read off a denoiser; a flow model's too (flow.FlowDenoiser), so
        # sample_<name> runs flow forms and schedule "flow" works through the wrapper
        for attr in (
            "sigma_min",
            "sigma_max",
            "sigmas",
            "sigma_data",
            "flow",
            "shift",
            "ramp_end",
            "prepare",
        ):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        cond: Cond | None = None,
        uncond: Cond | None = None,
        cond_scale: float | Tensor = 1.0,
    ) -> Tensor | Guided:
        cond = {} if cond is None else cond
        unguided = uncond is None or (not isinstance(cond_scale, Tensor) and cond_scale == 1.0)
        if unguided:
            out = self.inner_model(x, sigma, **cond)
            return Guided(out, out) if self.return_uncond else out
        assert uncond is not None
        out = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_cond([cond, uncond]))
        cond_out, uncond_out = out.chunk(2)
        guided = cfg_combine(cond_out, uncond_out, cond_scale)
        return Guided(guided, uncond_out) if self.return_uncond else guided
